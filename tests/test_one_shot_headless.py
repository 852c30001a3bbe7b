"""One-shot quantization (k-means, no fine-tuning) of a checkpoint without its AAM head, e.g. a WeSpeaker
``avg_model.pt`` saved without ``projection.*``: accepted when nothing needs the head (``lsv quantize --steps 0``,
a study with ``msft.total_steps = 0`` and no Hessian), refused naming what needs it otherwise."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from lsv_core.models import load_checkpoint, save_checkpoint
from search.cli import main
from search.config import load_study_config
from search.study.preflight import PreflightFailed, preflight_study
from tests.conftest import study_raw_config, to_toml


@pytest.fixture(scope="module")
def headless(tiny_study_inputs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    model, meta = load_checkpoint(tiny_study_inputs["checkpoint"])
    path = tmp_path_factory.mktemp("headless") / "headless.safetensors"
    save_checkpoint(model, path, metadata=meta)  # the network only: no projection.* tensors
    return path


def test_quantize_without_fine_tuning_needs_no_head(tiny_study_inputs: dict[str, Path], headless: Path,
                                                    tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["quantize", "--model", str(headless), "--corpus", str(tiny_study_inputs["corpus"]), "--cache",
            str(tiny_study_inputs["cache"]), "--max-trials", "60", "--device", "cpu"]
    out = tmp_path / "q.json"
    assert main([*base, "--bits", "4", "--steps", "0", "--json", str(out)]) == 0, capsys.readouterr().err
    result = json.loads(out.read_text())
    assert 0.0 <= result["eer"] <= 100.0 and result["avg_bits"] == pytest.approx(4.0)
    assert [s["steps"] for s in result["stages"]] == [0] * len(result["stages"])
    capsys.readouterr()
    for flags, what in ((["--bits", "4", "--steps", "2"], "fine-tuning (--steps 2) needs the head"),
                        (["--budget-mb", "1", "--steps", "0"], "the Hessian allocator (--budget-mb) needs"),
                        (["--bits", "2", "--steps", "0", "--msft", "sensitivity"], "the sensitivity order")):
        assert main([*base, *flags, "--json", str(tmp_path / "no.json")]) == 2
        err = " ".join(capsys.readouterr().err.split())
        assert "--model" in err and "holds no AAM head" in err and what in err, err
        assert "Traceback" not in err
    assert sorted(os.listdir(tmp_path)) == ["q.json"]


def _config(inputs: dict[str, Path], headless: Path, tmp_path: Path, **sections: dict):  # noqa: ANN202
    raw = study_raw_config(inputs, tmp_path / "runs", name="oneshot",
                           model={"checkpoint": str(headless), "train_if_missing": False}, **sections)
    toml = tmp_path / "oneshot.toml"
    toml.write_text(to_toml(raw))
    return load_study_config(toml)


def test_a_one_shot_study_accepts_a_headless_checkpoint(tiny_study_inputs: dict[str, Path], headless: Path,
                                                        tmp_path: Path) -> None:
    pre = preflight_study(_config(tiny_study_inputs, headless, tmp_path, msft={"total_steps": 0}))
    assert pre.baseline is not None and not pre.baseline.has_head and pre.space is not None
    for sections, what in (({"msft": {"total_steps": 4}}, "fine-tuning (msft.total_steps = 4)"),
                           ({"msft": {"total_steps": 0}, "seeds": {"allocator_fractions": [0.1]}},
                            "seeds.allocator_fractions = [0.1]; [] turns them off"),
                           ({"msft": {"total_steps": 0, "order": "sensitivity"}}, 'msft.order = "sensitivity"')):
        with pytest.raises(PreflightFailed) as exc:
            preflight_study(_config(tiny_study_inputs, headless, tmp_path, **sections))
        text = " ".join(str(exc.value).split())
        assert "model.checkpoint" in text and "holds no AAM head" in text and what in text, text
    assert not (tmp_path / "runs").exists()


def test_workbench_refuses_fine_tuning_without_a_head(tiny_study_inputs: dict[str, Path], headless: Path) -> None:
    """The library's own guard (for callers that skip the preflight): a clear error, not an AttributeError."""
    from lsv_core.errors import CheckpointError
    from lsv_core.quant import BitRecipe
    from lsv_core.quant.msft import MsftSchedule
    from lsv_core.workbench import DataPaths, Workbench, WorkbenchSpec

    corpus = tiny_study_inputs["corpus"]
    spec = WorkbenchSpec(checkpoint=headless, data=DataPaths.corpus(corpus), cache_dir=tiny_study_inputs["cache"],
                         max_trials=40, device="cpu")
    bench = Workbench.load(spec, progress=False)
    assert bench.head is None
    with pytest.raises(CheckpointError, match="total_steps=2"):
        bench.run(BitRecipe.uniform(bench.model, 4), MsftSchedule(total_steps=2, batch_size=8), n_boot=0)
    with pytest.raises(CheckpointError, match="Hessian traces"):
        bench.hessian_traces(n_probes=1, n_batches=1)
    done = bench.run(BitRecipe.uniform(bench.model, 4), MsftSchedule(total_steps=0), n_boot=0)
    assert done.avg_bits == pytest.approx(4.0) and 0.0 <= done.eer <= 100.0


@pytest.mark.slow
def test_a_one_shot_study_runs_on_a_headless_checkpoint(tiny_study_inputs: dict[str, Path], headless: Path,
                                                        tmp_path: Path) -> None:
    """The whole study on a real local Ray: trials and the fp32 control, none fine-tuned, none failed."""
    from search.cluster.storage import read_record
    from search.results.reading import study_status

    config = _config(tiny_study_inputs, headless, tmp_path, msft={"total_steps": 0},
                     study={"n_trials": 3, "concurrency": 1})
    assert main(["run", str(tmp_path / "oneshot.toml")]) == 0
    _, study = read_record(config)
    status = study_status(study, config.size_budget_bytes)
    assert status.n_failed == 0 and status.n_complete >= 3
