"""Bad input, command by command: each case asserts the exit status, that the message names the field, file
or line, that no traceback is printed, that no Ray process was started, and that nothing was written.

The cases are what a careless user does (typos, wrong types, files that are corrupt, empty, of another
sample rate or missing, impossible budgets, unreachable services); they run the real CLI (`main`) on real
files. Studies are checked by the preflight before any state exists (search/study/preflight.py).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from search.cli import main
from tests.conftest import study_raw_config, to_toml


def _ray_pids() -> set[int]:
    """Ray processes (GCS, raylet) descended from this test process: other Rays on the machine do not count."""
    parent: dict[int, int] = {}
    ray_like: set[int] = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes()
            parent[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if b"gcs_server" in cmd or b"raylet" in cmd:
            ray_like.add(int(entry.name))
    me, mine = os.getpid(), set()
    for pid in ray_like:
        p = pid
        while p > 1 and p in parent:
            p = parent[p]
            if p == me:
                mine.add(pid)
                break
    return mine


def _tree(root: Path, skip: tuple[Path, ...] = ()) -> dict[str, tuple[int, int]]:
    out = {}
    for p in root.rglob("*"):
        if any(p == s or s in p.parents for s in skip):
            continue
        st = p.lstat()
        out[str(p.relative_to(root))] = (st.st_size, st.st_mtime_ns)
    return out


def refused(argv: list[str], capsys: pytest.CaptureFixture[str], watch: Path, *expected: str,
            code: int = 2, skip: tuple[Path, ...] = ()) -> str:
    """Run ``lsv argv``; assert the exit code, the expected text, no traceback, no Ray, nothing written
    under ``watch`` (except ``skip``: caches). Returns the message (whitespace-normalised)."""
    import ray

    before, rays = _tree(watch, skip), _ray_pids()
    capsys.readouterr()
    try:
        status = main(argv)
    except SystemExit as exc:  # argparse's own usage errors
        status = exc.code
    out = capsys.readouterr()
    text = " ".join((out.out + out.err).split())
    assert status == code, f"exit {status}, expected {code}: {text[-2000:]}"
    for piece in expected:
        assert piece in text, f"{piece!r} not in: {text[-2000:]}"
    assert "Traceback" not in out.out + out.err
    assert not ray.is_initialized() and _ray_pids() <= rays, "a Ray process was started"
    assert _tree(watch, skip) == before, "something was written"
    return text


# -- lsv run: the study config --------------------------------------------------------------------------------
@dataclass(frozen=True)
class ConfigCase:
    id: str
    change: Callable[[dict], None]
    expected: tuple[str, ...]


def _set(section: str, **values: object) -> Callable[[dict], None]:
    def change(raw: dict) -> None:
        raw.setdefault(section, {}).update(values)
    return change


CONFIG_CASES = [
    ConfigCase("trials-string", _set("study", n_trials="1"), ("study.n_trials", "valid integer")),
    ConfigCase("trials-bool", _set("study", n_trials=True), ("study.n_trials", "valid integer")),
    ConfigCase("trials-zero", _set("study", n_trials=0), ("study.n_trials", "greater than or equal to 1")),
    ConfigCase("trials-float", _set("study", n_trials=2.5), ("study.n_trials",)),
    ConfigCase("timeout-zero", _set("study", timeout_s=0), ("study.timeout_s",)),
    ConfigCase("concurrency-zero", _set("study", concurrency=0), ("study.concurrency",)),
    ConfigCase("bad-name", _set("study", name="my study!"), ("study.name",)),
    ConfigCase("sampler", _set("study", sampler="cmaes"), ("study.sampler", "allowed samplers")),
    ConfigCase("seed-string", _set("study", seed="0"), ("study.seed",)),
    ConfigCase("unknown-field", _set("study", n_trail=3), ("study.n_trail", "unknown field")),
    ConfigCase("unknown-section", _set("studyy", name="x"), ("studyy", "unknown field")),
    ConfigCase("bits-bool", _set("space", bits=[True, 2]), ("space.bits",)),
    ConfigCase("bits-five", _set("space", bits=[1, 5]), ("space.bits", "allowed bit widths")),
    ConfigCase("bits-empty", _set("space", bits=[]), ("space.bits",)),
    ConfigCase("bits-twice", _set("space", bits=[2, 2]), ("space.bits", "listed twice")),
    ConfigCase("binary-mode", _set("space", binary_modes=["sign"]), ("space.binary_modes",)),
    ConfigCase("granularity", _set("space", granularity="row"), ("space.granularity",)),
    ConfigCase("fixed-bits", _set("space", fixed={"conv1": 6}), ("space.fixed",)),
    ConfigCase("train-if-missing-yes", _set("model", train_if_missing="yes"), ("model.train_if_missing",)),
    ConfigCase("synth-if-missing-1", _set("data", synthesize_if_missing=1), ("data.synthesize_if_missing",)),
    ConfigCase("max-trials-small", _set("data", max_trials=5), ("data.max_trials",)),
    ConfigCase("train-without-eval", _set("data", train="x"), ("give all of train, eval and trials",)),
    ConfigCase("budget-negative", _set("objectives", size_budget_mb=-1), ("objectives.size_budget_mb",)),
    ConfigCase("budget-string", _set("objectives", size_budget_mb="0.1"), ("objectives.size_budget_mb",)),
    ConfigCase("msft-order", _set("msft", order="random"), ("msft.order",)),
    ConfigCase("msft-steps", _set("msft", total_steps=-1), ("msft.total_steps",)),
    ConfigCase("msft-lr", _set("msft", lr=0), ("msft.lr",)),
    ConfigCase("msft-stage-frames", _set("msft", stage_eval_frames=5), ("msft.stage_eval_frames",)),
    ConfigCase("msft-centroids", _set("msft", centroid_update="adam"), ("msft.centroid_update",)),
    ConfigCase("allocator-fraction", _set("seeds", allocator_fractions=[1.5]), ("seeds.allocator_fractions",)),
    ConfigCase("early-stop-margin", _set("early_stop", margin=-1), ("early_stop.margin",)),
    ConfigCase("device-tpu", _set("resources", device="tpu"), ("resources.device", "allowed: 'auto'")),
    ConfigCase("device-cuda-no-gpu", _set("resources", device="cuda"), ("resources", "needs gpu > 0")),
    ConfigCase("gpu-negative", _set("resources", gpu=-1), ("resources.gpu",)),
    ConfigCase("bad-nodes", _set("resources", bad_nodes="ignore"), ("resources.bad_nodes",)),
    ConfigCase("optuna-scheme", _set("storage", optuna="redis://localhost/0"), ("storage.optuna", "RDB URL")),
    ConfigCase("mlflow-scheme", _set("storage", mlflow="ftp://x"), ("storage.mlflow",)),
    ConfigCase("lease-short", _set("storage", lease_timeout_s=1), ("storage.lease_timeout_s",)),
]


@pytest.mark.parametrize("case", CONFIG_CASES, ids=[c.id for c in CONFIG_CASES])
def test_run_refuses_bad_config(case: ConfigCase, tiny_study_inputs: dict[str, Path], tmp_path: Path,
                                capsys: pytest.CaptureFixture[str]) -> None:
    raw = study_raw_config(tiny_study_inputs, tmp_path / "runs", name="bad")
    case.change(raw)
    toml = tmp_path / "bad.toml"
    toml.write_text(to_toml(raw))
    refused(["run", str(toml)], capsys, tmp_path, str(toml), *case.expected)


def test_run_config_file_problems(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "studies").mkdir()
    (tmp_path / "studies" / "a.toml").write_text("[study]\nname = 'a'\n")
    refused(["run", str(tmp_path / "studies")], capsys, tmp_path, "is a folder", "a.toml")
    refused(["run", str(tmp_path / "nope.toml")], capsys, tmp_path, "nope.toml does not exist")
    broken = tmp_path / "broken.toml"
    broken.write_text("[study]\nname = 'x'\nn_trials = \n")
    refused(["run", str(broken)], capsys, tmp_path, "broken.toml", "not valid TOML", "line 3")
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    refused(["run", str(binary)], capsys, tmp_path, "binary.toml")


# -- lsv run: data, checkpoint, space, storage, cluster ---------------------------------------------------------
def _copy_inputs(inputs: dict[str, Path], tmp_path: Path) -> dict[str, Path]:
    corpus = tmp_path / "corpus"
    shutil.copytree(inputs["corpus"], corpus)
    ckpt = tmp_path / "baseline.safetensors"
    shutil.copyfile(inputs["checkpoint"], ckpt)
    return {"corpus": corpus, "checkpoint": ckpt, "cache": tmp_path / "cache"}


def _first_wav(corpus: Path, split: str) -> tuple[str, Path]:
    line = (corpus / split / "wav.scp").read_text().splitlines()[0]
    utt, path = line.split()
    p = Path(path)
    return utt, p if p.is_absolute() else corpus / split / p


def _write_study(inputs: dict[str, Path], tmp_path: Path, **sections: dict) -> Path:
    raw = study_raw_config(inputs, tmp_path / "runs", name="bad", **sections)
    toml = tmp_path / "bad.toml"
    toml.write_text(to_toml(raw))
    return toml


@pytest.fixture
def own_inputs(tiny_study_inputs: dict[str, Path], tmp_path: Path) -> dict[str, Path]:
    return _copy_inputs(tiny_study_inputs, tmp_path)


def _corrupt(path: Path) -> None:
    path.write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk" * 4)


def _empty_file(path: Path) -> None:
    path.write_bytes(b"")


def _no_samples(path: Path) -> None:
    sf.write(path, np.zeros(0, dtype=np.float32), 16000, subtype="PCM_16")


def _rate_8k(path: Path) -> None:
    sf.write(path, np.zeros(8000, dtype=np.float32), 8000, subtype="PCM_16")


def _tiny(path: Path) -> None:
    sf.write(path, np.zeros(100, dtype=np.float32), 16000, subtype="PCM_16")


AUDIO_DAMAGE = {"corrupt": (_corrupt, "unreadable"), "zero-bytes": (_empty_file, "empty (0 bytes)"),
                "no-samples": (_no_samples, "empty (0 samples)"), "8khz": (_rate_8k, "8000 Hz"),
                "too-short": (_tiny, "shorter than one 400-sample fbank frame"),
                "missing": (Path.unlink, "does not exist")}


@pytest.mark.parametrize("split", ["train", "eval"])
@pytest.mark.parametrize("damage", sorted(AUDIO_DAMAGE))
def test_run_names_bad_audio(damage: str, split: str, own_inputs: dict[str, Path], tmp_path: Path,
                             capsys: pytest.CaptureFixture[str]) -> None:
    utt, wav = _first_wav(own_inputs["corpus"], split)
    if split == "eval":  # an evaluation file the trial list uses
        trials = (own_inputs["corpus"] / "eval" / "trials").read_text().split()
        assert utt in trials
    fn, reason = AUDIO_DAMAGE[damage]
    fn(wav)
    toml = _write_study(own_inputs, tmp_path)
    text = refused(["run", str(toml)], capsys, tmp_path, f"utterance {utt}", str(wav), reason,
                   skip=(own_inputs["cache"],))
    assert "--resample" not in text  # no flag that does not exist


def test_run_lists_every_problem_at_once(own_inputs: dict[str, Path], tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    utt, wav = _first_wav(own_inputs["corpus"], "train")
    _corrupt(wav)
    lines = (own_inputs["corpus"] / "eval" / "trials").read_text().splitlines()
    lines[2] = lines[2].replace(lines[2].split()[1], "nobody-0001")
    (own_inputs["corpus"] / "eval" / "trials").write_text("\n".join(lines) + "\n")
    toml = _write_study(own_inputs, tmp_path, objectives={"size_budget_mb": 0.000001},
                        storage={"optuna": f"sqlite:///{tmp_path / 'missing' / 'o.db'}"})
    text = refused(["run", str(toml), "--address", "127.0.0.1:1"], capsys, tmp_path,
                   "problem(s) found before starting", f"utterance {utt}", "trials:3", "nobody-0001",
                   "objectives.size_budget_mb", "storage.optuna", "127.0.0.1:1", skip=(own_inputs["cache"],))
    assert text.count(" - ") >= 5


def test_run_trial_list_and_listing_problems(own_inputs: dict[str, Path], tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    corpus = own_inputs["corpus"]
    trials = corpus / "eval" / "trials"
    original = trials.read_text()
    toml = _write_study(own_inputs, tmp_path)
    skip = (own_inputs["cache"],)
    trials.write_text(original + "only two\n")
    refused(["run", str(toml)], capsys, tmp_path, f"{trials}:{len(original.splitlines()) + 1}", "expected 3 fields",
            skip=skip)
    targets = [line for line in original.splitlines() if line.split()[-1] == "target" or line.startswith("1 ")]
    trials.write_text("\n".join(targets) + "\n")
    refused(["run", str(toml)], capsys, tmp_path, "only target trials", skip=skip)
    trials.write_text(original)
    scp = corpus / "train" / "wav.scp"
    first = scp.read_text().splitlines()[0]
    scp.write_text(scp.read_text() + first + "\n")
    refused(["run", str(toml)], capsys, tmp_path, "wav.scp", "duplicate utterance id", skip=skip)
    scp.write_text(scp.read_text().replace(first + "\n", "", 1))
    u2s = corpus / "train" / "utt2spk"
    u2s.write_text("\n".join(u2s.read_text().splitlines()[1:]) + "\n")
    refused(["run", str(toml)], capsys, tmp_path, "has no speaker in", "utt2spk", skip=skip)


def test_run_missing_paths_never_start_surprise_work(own_inputs: dict[str, Path], tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    typo = tmp_path / "corpsu"
    toml = _write_study({**own_inputs, "corpus": typo}, tmp_path, data={"synthesize_if_missing": True})
    refused(["run", str(toml)], capsys, tmp_path, "data.corpus", f"{typo} does not exist",
            "only at its default path", skip=(own_inputs["cache"],))
    assert not typo.exists()
    ckpt = tmp_path / "baselien.safetensors"
    toml = _write_study({**own_inputs, "checkpoint": ckpt}, tmp_path, model={"train_if_missing": True})
    refused(["run", str(toml)], capsys, tmp_path, "model.checkpoint", f"{ckpt} does not exist",
            "only the default baseline", skip=(own_inputs["cache"],))
    half = tmp_path / "half"
    shutil.copytree(own_inputs["corpus"], half)
    (half / "corpus.json").unlink()  # an interrupted synthesis
    toml = _write_study({**own_inputs, "corpus": half}, tmp_path)
    refused(["run", str(toml)], capsys, tmp_path, "data.corpus", "not a finished corpus", skip=(own_inputs["cache"],))


def test_run_checkpoint_problems(own_inputs: dict[str, Path], tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    from lsv_core.models import build_model, load_checkpoint, save_checkpoint

    skip = (own_inputs["cache"],)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 100)
    refused(["run", str(_write_study({**own_inputs, "checkpoint": garbage}, tmp_path))], capsys, tmp_path,
            "model.checkpoint", str(garbage), skip=skip)
    model, meta = load_checkpoint(own_inputs["checkpoint"])
    headless = tmp_path / "headless.safetensors"
    save_checkpoint(model, headless, metadata=meta)
    refused(["run", str(_write_study({**own_inputs, "checkpoint": headless}, tmp_path))], capsys, tmp_path,
            "model.checkpoint", "no AAM head", skip=skip)
    pt = tmp_path / "avg_model.pt"
    torch.save({k: v for k, v in build_model("ResNet34", embed_dim=32).state_dict().items()}, pt)
    refused(["run", str(_write_study({**own_inputs, "checkpoint": pt}, tmp_path))], capsys, tmp_path,
            "model.checkpoint", "WeSpeaker state dict", "model.arch", skip=skip)
    toml = _write_study({**own_inputs, "checkpoint": pt}, tmp_path, model={"arch": "ResNet18"})
    refused(["run", str(toml)], capsys, tmp_path, "model.checkpoint", str(pt), skip=skip)


def test_run_space_and_budget_problems(own_inputs: dict[str, Path], tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    skip = (own_inputs["cache"],)
    refused(["run", str(_write_study(own_inputs, tmp_path, space={"fixed": {"conv9": 4}}))], capsys, tmp_path,
            "space", "conv9", skip=skip)
    text = refused(["run", str(_write_study(own_inputs, tmp_path, objectives={"size_budget_mb": 0.0001}))],
                   capsys, tmp_path, "objectives.size_budget_mb", "below the smallest model", skip=skip)
    assert "raise it to at least" in text


def test_run_storage_and_cluster_problems(own_inputs: dict[str, Path], tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    import time

    from tests.services import free_port

    skip = (own_inputs["cache"],)
    toml = _write_study(own_inputs, tmp_path, storage={"optuna": f"sqlite:///{tmp_path / 'no' / 'dir' / 'o.db'}"})
    refused(["run", str(toml)], capsys, tmp_path, "storage.optuna", "does not exist", skip=skip)
    port = free_port()
    toml = _write_study(own_inputs, tmp_path,
                        storage={"optuna": f"postgresql://lsv:hunter2@127.0.0.1:{port}/lsv"})
    text = refused(["run", str(toml)], capsys, tmp_path, "storage.optuna", f"postgresql://lsv:***@127.0.0.1:{port}",
                   skip=skip)
    assert "hunter2" not in text
    toml = _write_study(own_inputs, tmp_path, storage={"mlflow": f"http://127.0.0.1:{free_port()}"})
    refused(["run", str(toml)], capsys, tmp_path, "storage.mlflow", "no MLflow server answers", skip=skip)
    toml = _write_study(own_inputs, tmp_path)
    t0 = time.monotonic()
    refused(["run", str(toml), "--address", "127.0.0.1:1"], capsys, tmp_path, "no Ray cluster answers at 127.0.0.1:1",
            skip=skip)
    assert time.monotonic() - t0 < 30
    refused(["run", str(toml), "--address", "nohost"], capsys, tmp_path, "'nohost' is not HOST:PORT", skip=skip)
    blocker = tmp_path / "afile"
    blocker.write_text("not a folder")
    toml = _write_study(own_inputs, tmp_path, study={"out_dir": str(blocker / "runs")})
    refused(["run", str(toml)], capsys, tmp_path, "study.out_dir", "is a file, not a folder", skip=skip)


def test_run_fresh_and_changed_config_keep_the_study(tiny_study_inputs: dict[str, Path], tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """A bad config with --fresh moves nothing aside; a changed config is refused, the study untouched."""
    study_dir = tmp_path / "runs" / "bad"
    study_dir.mkdir(parents=True)
    (study_dir / "study.json").write_text(json.dumps({"digest": "0123456789abcdef", "config": {}}))
    toml = _write_study(tiny_study_inputs, tmp_path, objectives={"size_budget_mb": 0.0001})
    refused(["run", str(toml), "--fresh"], capsys, tmp_path, "objectives.size_budget_mb",
            skip=(tiny_study_inputs["cache"],))
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["bad"]


# -- lsv status / report / export before a study exists ------------------------------------------------------
@pytest.mark.parametrize("command", [["status"], ["report"], ["export", "--knee", "--out", "OUT"]])
def test_commands_on_a_study_never_run(command: list[str], tiny_study_inputs: dict[str, Path], tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    toml = _write_study(tiny_study_inputs, tmp_path)
    argv = [command[0], str(toml), *[str(tmp_path / "out") if a == "OUT" else a for a in command[1:]]]
    refused(argv, capsys, tmp_path, "has not been run yet", "lsv run")
    assert not (tmp_path / "runs").exists() and not (tmp_path / "out").exists()


def test_export_selector_problems(tiny_study_inputs: dict[str, Path], tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    toml = _write_study(tiny_study_inputs, tmp_path)
    refused(["export", str(toml), "--max-eer", "150", "--out", str(tmp_path / "o")], capsys, tmp_path, "--max-eer", "150 should be >= 0 and <= 100")
    refused(["export", str(toml), "--max-size-mb", "0", "--out", str(tmp_path / "o")], capsys, tmp_path,
            "--max-size-mb", "0 should be > 0")
    refused(["export", str(toml), "--knee", "--eer-tolerance", "-1", "--out", str(tmp_path / "o")], capsys,
            tmp_path, "--eer-tolerance", "-1 should be >= 0")
    refused(["export", str(toml), "--trial", "-3", "--out", str(tmp_path / "o")], capsys, tmp_path, "--trial", "-3 should be >= 0")
    refused(["export", str(toml), "--out", str(tmp_path / "o")], capsys, tmp_path, "one of the arguments", code=2)
    assert os.listdir(tmp_path) == ["bad.toml"]


# -- lsv evaluate / quantize / train / corpus -----------------------------------------------------------------
def test_evaluate_bad_input(own_inputs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    corpus, ckpt, skip = own_inputs["corpus"], own_inputs["checkpoint"], (own_inputs["cache"],)
    base = ["evaluate", "--model", str(ckpt), "--data", str(corpus / "eval"), "--trials", str(corpus / "eval" / "trials"),
            "--cache", str(own_inputs["cache"])]
    for n in ("0", "-5"):
        text = refused([*base, "--n-boot", n, "--json", str(tmp_path / "e.json")], capsys, tmp_path, "--n-boot",
                       "should be >= 1", skip=skip)
        assert "NaN" not in text
    existing = tmp_path / "old.json"
    existing.write_text("{}")
    refused([*base, "--json", str(existing)], capsys, tmp_path, "--json", "exists; pass --force", skip=skip)
    refused(["evaluate", "--model", str(tmp_path / "none.safetensors"), *base[3:]], capsys, tmp_path, "--model",
            "does not exist", skip=skip)
    refused([*base[:3], "--data", str(tmp_path / "nodata"), *base[5:]], capsys, tmp_path, "--data",
            "does not exist", skip=skip)
    refused([*base, "--cohort", str(tmp_path / "nocohort")], capsys, tmp_path, "--cohort", skip=skip)
    utt, wav = _first_wav(corpus, "eval")
    _rate_8k(wav)
    text = refused(base, capsys, tmp_path, f"utterance {utt}", "8000 Hz", skip=skip)
    assert "--resample" not in text


def test_quantize_bad_input(own_inputs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from lsv_core.models import load_checkpoint, save_checkpoint

    corpus, ckpt, skip = own_inputs["corpus"], own_inputs["checkpoint"], (own_inputs["cache"],)
    base = ["quantize", "--model", str(ckpt), "--corpus", str(corpus), "--cache", str(own_inputs["cache"]),
            "--steps", "2"]
    # Refused at once, before any Hessian trace or quantization (the old `--budget-mb -1` ran 74 s first).
    refused([*base, "--budget-mb", "-1"], capsys, tmp_path, "--budget-mb", "should be > 0", skip=skip)
    refused([*base, "--budget-mb", "0.000001"], capsys, tmp_path, "--budget-mb", "below the smallest model",
            skip=skip)
    existing = tmp_path / "q.json"
    existing.write_text("{}")
    refused([*base, "--bits", "4", "--json", str(existing)], capsys, tmp_path, "--json", "exists", skip=skip)
    refused([*base, "--bits", "4", "--out", str(existing)], capsys, tmp_path, "--out", "exists", skip=skip)
    refused([*base, "--recipe", str(tmp_path / "none.toml")], capsys, tmp_path, "--recipe", "none.toml",
            skip=skip)
    bad_recipe = tmp_path / "bad.json"
    bad_recipe.write_text(json.dumps({"layers": {"conv9": 4}}))
    refused([*base, "--recipe", str(bad_recipe)], capsys, tmp_path, "--recipe", "conv9", skip=skip)
    refused([*base, "--bits", "5"], capsys, tmp_path, "--bits", "invalid choice", skip=skip)
    refused([*base[:-1], "-1", "--bits", "4"], capsys, tmp_path, "--steps", "-1 should be >= 0", skip=skip)
    refused([*base, "--bits", "4", "--device", "tpu"], capsys, tmp_path, "--device", "tpu", skip=skip)
    model, meta = load_checkpoint(ckpt)
    headless = tmp_path / "headless.safetensors"
    save_checkpoint(model, headless, metadata=meta)
    refused(["quantize", "--model", str(headless), *base[3:], "--bits", "4"], capsys, tmp_path, "no AAM head",
            skip=skip)
    refused(["quantize", "--model", str(ckpt), "--train", str(tmp_path / "t"), "--eval", str(corpus / "eval"),
             "--trials", str(corpus / "eval" / "trials"), "--bits", "4"], capsys, tmp_path, "--train",
            "does not exist", skip=skip)


def test_train_and_corpus_bad_input(own_inputs: dict[str, Path], tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    corpus, skip = own_inputs["corpus"], (own_inputs["cache"],)
    out = tmp_path / "new.safetensors"
    base = ["train", "--corpus", str(corpus), "--out", str(out), "--cache", str(own_inputs["cache"])]
    refused(["train", "--corpus", str(corpus), "--out", str(own_inputs["checkpoint"])], capsys, tmp_path, "--out",
            "exists", skip=skip)
    cfg = tmp_path / "train.json"
    cfg.write_text(json.dumps({"stepz": 10}))
    refused([*base, "--config", str(cfg)], capsys, tmp_path, "unknown field(s) ['stepz']", skip=skip)
    cfg.write_text("{not json")
    refused([*base, "--config", str(cfg)], capsys, tmp_path, "--config", "JSON", skip=skip)
    refused([*base, "--steps", "0"], capsys, tmp_path, "--steps", "should be >= 1", skip=skip)
    utt, wav = _first_wav(corpus, "train")
    _corrupt(wav)
    refused(base, capsys, tmp_path, f"utterance {utt}", "unreadable", skip=skip)
    refused(["train", "--train", str(tmp_path / "nowhere"), "--out", str(out)], capsys, tmp_path, "--train",
            "does not exist", skip=skip)
    assert not out.exists()
    refused(["corpus", "synth", "--out", str(corpus), "--speakers", "4", "--utts", "2", "--eval-speakers", "2"],
            capsys, tmp_path, "not empty", "--force", skip=skip)
    refused(["corpus", "synth", "--out", str(tmp_path / "c"), "--speakers", "0"], capsys, tmp_path, "speakers",
            skip=skip)
    refused(["corpus", "synth", "--out", str(tmp_path / "c"), "--workers", "0"], capsys, tmp_path, "workers",
            skip=skip)
