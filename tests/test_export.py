"""Export: trial selection (fast, synthetic), then one real small study (slow): the exported bundle round-trips
(packed file, WeSpeaker state dict with a strict load, ONNX vs torch), is registered in MLflow, and every
refusal (existing folder, no trial meets the rule, tampered file size, EER that no longer reproduces) exits 2.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlflow
import numpy as np
import optuna
import pytest
import torch

from lsv_core.errors import ConfigError
from lsv_core.export.bundle import packed_file_sizes
from search.cli import main
from search.pareto import TrialPoint
from search.results import load_points
from search.selection import NoTrialMeetsRule, SelectionRule, select_trial
from tests.conftest import study_raw_config, to_toml

POINTS = [
    TrialPoint(0, eer=20.0, size_bytes=1_000),
    TrialPoint(1, eer=10.0, size_bytes=3_000),
    TrialPoint(2, eer=5.0, size_bytes=9_000),
    TrialPoint(3, eer=10.0, size_bytes=3_000, memoized_from=1),
    TrialPoint(5, eer=30.0, size_bytes=8_000),
]


# -- fast: selection ------------------------------------------------------------------------------------------
def test_selection_rules() -> None:
    assert select_trial(POINTS, SelectionRule(trial=5)).number == 5
    assert select_trial(POINTS, SelectionRule(max_size_mb=0.005)).number == 1  # best EER <= 5000 B; first copy
    assert select_trial(POINTS, SelectionRule(max_eer=12.0)).number == 1  # smallest with EER <= 12 %
    assert select_trial(POINTS, SelectionRule(knee=True)).number == 1


def test_no_trial_meets_rule_lists_the_three_closest() -> None:
    with pytest.raises(NoTrialMeetsRule, match=r"size <= 0.0005 MB.*Closest: trial 0: .*; trial 1: .*; trial 3: "):
        select_trial(POINTS, SelectionRule(max_size_mb=0.0005))
    with pytest.raises(NoTrialMeetsRule, match=r"EER <= 1 %.*Closest: trial 2: EER 5.00 %.*trial 1: .*trial 3: "):
        select_trial(POINTS, SelectionRule(max_eer=1.0))
    with pytest.raises(NoTrialMeetsRule, match=r"trial 4 is not a complete.*Closest: trial 3: .*trial 5: .*trial 2: "):
        select_trial(POINTS, SelectionRule(trial=4))
    with pytest.raises(NoTrialMeetsRule, match="no complete trials"):
        select_trial([], SelectionRule(knee=True))


def test_rule_validation() -> None:
    with pytest.raises(ConfigError, match="exactly one"):
        SelectionRule()
    with pytest.raises(ConfigError, match="exactly one"):
        SelectionRule(trial=1, knee=True)
    with pytest.raises(ConfigError, match="max_size_mb=0"):
        SelectionRule(max_size_mb=0)
    with pytest.raises(ConfigError, match="max_eer=150"):
        SelectionRule(max_eer=150)


# -- slow: one real study ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_study(tiny_study_inputs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict:
    from search.config import parse_study_config
    from search.study import run_study

    root = tmp_path_factory.mktemp("export_study")
    raw = study_raw_config(tiny_study_inputs, root, name="exp")
    config = parse_study_config(raw)
    run_study(config, progress=False)
    toml = root / "exp.toml"
    toml.write_text(to_toml(raw))
    return {"config": config, "toml": toml, "root": root}


def _best(config: object) -> TrialPoint:
    points = [p for p in load_points(config) if p.memoized_from is None]
    return min(points, key=lambda p: (p.eer, p.size_bytes, p.number))


@pytest.mark.slow
def test_export_round_trips_and_registers(real_study: dict, capsys: pytest.CaptureFixture[str]) -> None:
    import onnxruntime as ort

    from lsv_core.export.packed import load_packed
    from lsv_core.models import build_model, load_pretrained
    from lsv_core.quant import BitRecipe, recipe_of

    config, out = real_study["config"], real_study["root"] / "knee"
    assert main(["export", str(real_study["toml"]), "--knee", "--out", str(out)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx", "model.packed.safetensors", "model_card.md",
                                                    "recipe.json", "wespeaker_avg_model.pt"]
    # Evaluation is deterministic: the re-evaluated EER is the logged one exactly, not just within 0.05.
    assert result["eer_reevaluated"] == result["eer_logged"]

    study = optuna.load_study(study_name="exp", storage=config.optuna_url)
    trial = study.trials[result["trial"]]
    doc = json.loads((out / "recipe.json").read_text())
    recipe = BitRecipe.load(out / "recipe.json")
    assert recipe == BitRecipe.from_mapping(trial.user_attrs["recipe"])
    prov = doc["provenance"]
    assert prov["optuna_trial"] == result["trial"] and prov["study"] == "exp"
    assert prov["mlflow_run_id"] == result["run_id"] and prov["git_commit"] and prov["lsv_version"]
    assert prov["config_digest"] == config.digest()
    assert doc["metrics"]["size_bytes"] == int(trial.values[1])

    # Packed: the logged size plus the header, and the recipe of the trial.
    total, header = packed_file_sizes(out / "model.packed.safetensors")
    assert total - header == int(trial.values[1])
    packed = load_packed(out / "model.packed.safetensors")
    assert recipe_of(packed) == recipe
    # WeSpeaker layout: a strict load into a fresh network, and our loader, give the packed model's outputs.
    arch = packed.arch
    state = torch.load(out / "wespeaker_avg_model.pt", map_location="cpu", weights_only=True)
    plain = build_model(arch["name"], **arch["kwargs"])
    plain.load_state_dict(state, strict=True)
    plain.eval()
    ours = load_pretrained(out / "wespeaker_avg_model.pt", arch["name"], **arch["kwargs"])
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    for frames in (150, 263):
        x = torch.randn(3, frames, arch["kwargs"]["feat_dim"], generator=torch.Generator().manual_seed(frames))
        with torch.no_grad():
            want = packed(x)
            assert float((plain(x) - want).abs().max()) <= 1e-5
            assert float((ours(x) - want).abs().max()) <= 1e-5
        got = session.run(["embedding"], {"fbank": x.numpy()})[0]
        assert np.abs(got - want.numpy()).max() <= 1e-4

    card = (out / "model_card.md").read_text()
    assert f"{int(trial.values[1]):,} bytes" in card and f"{trial.values[0]:.2f} %" in card and "| `conv1` |" in card

    # Registered: the alias points at a version whose source is the bundle logged with the trial's run.
    client = mlflow.MlflowClient(config.mlflow_uri)
    version = client.get_model_version_by_alias("lsv-exp", "chosen")
    assert str(version.version) == result["model_version"] and version.run_id == result["run_id"]
    assert version.source.endswith("/export") and version.tags["lsv.optuna_trial"] == str(result["trial"])
    logged = {a.path for a in client.list_artifacts(result["run_id"], "export")}
    assert "export/model.onnx" in logged and "export/wespeaker_avg_model.pt" in logged


@pytest.mark.slow
def test_existing_folder_needs_force(real_study: dict, capsys: pytest.CaptureFixture[str]) -> None:
    out = real_study["root"] / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["export", str(real_study["toml"]), "--knee", "--out", str(out)]) == 2
    assert "exists" in capsys.readouterr().err and (out / "keep.txt").read_text() == "mine"
    best = _best(real_study["config"])
    assert main(["export", str(real_study["toml"]), "--trial", str(best.number), "--out", str(out), "--force",
                 "--no-register"]) == 0
    assert not (out / "keep.txt").exists() and (out / "model.onnx").exists()
    assert json.loads((out / "recipe.json").read_text())["provenance"]["registered_model"] is None


@pytest.mark.slow
def test_no_trial_meets_rule_exits_2(real_study: dict, capsys: pytest.CaptureFixture[str]) -> None:
    out = real_study["root"] / "none"
    assert main(["export", str(real_study["toml"]), "--max-size-mb", "0.000001", "--out", str(out)]) == 2
    err = capsys.readouterr().err.replace("\n", " ")
    assert "no trial has size <= 1e-06 MB" in err and err.count("trial ") >= 4  # the rule + 3 closest
    assert main(["export", str(real_study["toml"]), "--trial", "999", "--out", str(out)]) == 2
    assert "trial 999 is not a complete trial" in capsys.readouterr().err.replace("\n", " ")
    assert not out.exists()


@pytest.mark.slow
def test_tampered_packed_file_is_refused(real_study: dict, capsys: pytest.CaptureFixture[str]) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    best = _best(real_study["config"])
    assert best.eer < 45.0, "the tampered model scores ~50 % EER; the test needs a trial clearly better"
    packed = Path(best.packed_path)
    backup = real_study["root"] / "backup.safetensors"
    shutil.copyfile(packed, backup)
    out = real_study["root"] / "tampered"
    args = ["export", str(real_study["toml"]), "--trial", str(best.number), "--out", str(out), "--no-register"]
    try:
        # 1. Size: 64 extra bytes of tensors (as if written with another recipe) are refused before loading.
        with packed.open("ab") as f:
            f.write(b"\0" * 64)
        assert main(args) == 2
        assert f"the study logged size_bytes={best.size_bytes:,}" in capsys.readouterr().err.replace("\n", " ")
        # 2. Same size, other weights: every codebook zeroed (same header, same bytes) -> the EER moves.
        shutil.copyfile(backup, packed)
        with safe_open(str(packed), framework="pt") as f:
            meta = f.metadata()
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        tensors = {k: torch.zeros_like(v) if k.endswith((".codebook", ".alpha")) else v for k, v in tensors.items()}
        save_file(tensors, str(packed), metadata=meta)
        assert packed.stat().st_size == backup.stat().st_size
        assert main(args) == 2
        assert "re-evaluating" in capsys.readouterr().err.replace("\n", " ")
        assert not out.exists()
    finally:
        shutil.copyfile(backup, packed)


@pytest.mark.slow
def test_missing_packed_file_is_read_from_the_mlflow_run(real_study: dict) -> None:
    # Workers write packed files under Ray's trial folders; the copy logged with the trial's MLflow run
    # is the durable one, and export falls back to it.
    best = _best(real_study["config"])
    packed = Path(best.packed_path)
    aside = real_study["root"] / "aside.safetensors"
    shutil.move(packed, aside)
    out = real_study["root"] / "from_mlflow"
    try:
        assert main(["export", str(real_study["toml"]), "--trial", str(best.number), "--out", str(out),
                     "--no-register"]) == 0
        assert (out / "model.packed.safetensors").read_bytes() == aside.read_bytes()
    finally:
        shutil.move(aside, packed)
