"""Export: trial selection (fast, synthetic), then one real small study (slow): the exported bundle round-trips
(model.onnx with the codebooks and exactly the logged size, packed file, WeSpeaker state dict with a strict
load, infer.json thresholds), is registered in MLflow, and every refusal (existing folder that is not a
bundle, an --out overlapping the study, no trial meets the rule, tampered file bytes, a recipe that does not
match the model, an EER that no longer reproduces) exits 2 with nothing written or deleted.
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
from search.results.export import ExportMismatch
from search.results.pareto import TrialPoint
from search.results.reading import load_points
from search.results.selection import NoTrialMeetsRule, SelectionRule, select_trial
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
    from search.study.run import run_study

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


# No wespeaker_avg_model.pt: the test baseline is a ThinResNet with first_stride=2, not a WeSpeaker architecture
# (tests/test_wespeaker_layout.py checks the file against WeSpeaker's own classes for those that are).
BUNDLE_FILES = [".lsv-bundle.json", "infer.json", "infer.py", "model.onnx", "model.packed.safetensors",
                "model_card.md", "recipe.json", "requirements.txt"]


@pytest.mark.slow
def test_export_round_trips_and_registers(real_study: dict, capsys: pytest.CaptureFixture[str]) -> None:
    import onnx
    import onnxruntime as ort
    from safetensors import safe_open

    from lsv_core.export.onnx_codebook import graph_template
    from lsv_core.export.packed import load_packed
    from lsv_core.quant import BitRecipe, packed_size_bytes, packed_tensor_bytes, recipe_of

    config, out = real_study["config"], real_study["root"] / "knee"
    assert main(["export", str(real_study["toml"]), "--knee", "--out", str(out)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert sorted(p.name for p in out.iterdir()) == BUNDLE_FILES
    assert json.loads((out / ".lsv-bundle.json").read_text())["files"] == sorted(set(BUNDLE_FILES) - {".lsv-bundle.json"})
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

    # One number for size: the bytes of model.onnx are the study's objective, MLflow's size_bytes, the
    # front's x and what recipe.json, the card and the export result say.
    size = (out / "model.onnx").stat().st_size
    client = mlflow.MlflowClient(config.mlflow_uri)
    assert size == int(trial.values[1]) == result["size_bytes"] == doc["metrics"]["size_bytes"]
    assert client.get_run(result["run_id"]).data.metrics["size_bytes"] == size
    assert next(p.size_bytes for p in load_points(config) if p.number == result["trial"]) == size
    packed = load_packed(out / "model.packed.safetensors")
    assert recipe_of(packed) == recipe and packed_size_bytes(packed) == size
    total, header = packed_file_sizes(out / "model.packed.safetensors")
    assert total - header == packed_tensor_bytes(packed) == result["tensor_bytes"]

    # model.onnx keeps the codebooks: the packed file's index bytes and codebooks; BatchNorm is folded.
    proto = onnx.load(str(out / "model.onnx"))
    inits = {t.name: t for t in proto.graph.initializer}
    layers = graph_template(packed).layers
    with safe_open(str(out / "model.packed.safetensors"), framework="np") as f:
        for layer, spec in recipe.items():
            name = layers[layer].name
            assert name not in inits  # the float weight is computed in the graph, not stored
            assert inits[f"{name}p"].raw_data == f.get_tensor(f"{layer}.weight.packed").tobytes()
            stored = "alpha" if spec.mode == "static" else "codebook"
            assert np.array_equal(onnx.numpy_helper.to_array(inits[f"{name}{stored[0]}"]).ravel(),
                                  f.get_tensor(f"{layer}.weight.{stored}"))
    assert not any(n.op_type == "BatchNormalization" for n in proto.graph.node)
    # Its tensor data is at most the packed tensors (folding stores 2 floats per BatchNorm channel, not 4)
    # and the rest, the graph, a fixed ~2.8 kB plus 0.1-0.45 kB of unpacking nodes per quantized layer.
    data = sum(len(t.raw_data) for t in proto.graph.initializer)
    assert data <= result["tensor_bytes"] and size - data <= 3_000 + 450 * len(recipe), (size, data, len(recipe))
    assert all(f"{layers[layer].name}s" in inits for layer in recipe if layers[layer].fold is not None)
    assert result["onnx_min_cosine"] >= 0.9999 and abs(result["onnx_eer"] - result["eer_reevaluated"]) <= 0.05

    # onnxruntime gives the packed model's embeddings.
    arch = packed.arch
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    for frames in (150, 263):
        x = torch.randn(3, frames, arch["kwargs"]["feat_dim"], generator=torch.Generator().manual_seed(frames))
        with torch.no_grad():
            want = packed(x)
        got = session.run(["embedding"], {"fbank": x.numpy()})[0]
        cos = (got * want.numpy()).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want.numpy(), axis=1)
        assert cos.min() >= 0.9999

    # infer.py's thresholds come from the re-evaluation's scores.
    infer = json.loads((out / "infer.json").read_text())
    eer_point = infer["thresholds"]["eer"]
    assert eer_point["threshold"] == result["thresholds"]["eer"]
    assert abs(100 * (eer_point["p_miss"] + eer_point["p_fa"]) / 2 - result["eer_reevaluated"]) < 3.0
    assert infer["thresholds"]["min_dcf"]["p_target"] == 0.01 and infer["evaluated_on"]["n_trials"] > 0

    card = (out / "model_card.md").read_text()
    assert f"{size:,} bytes" in card and f"{trial.values[0]:.2f} %" in card and "| `conv1` |" in card
    assert "python infer.py score" in card and "BatchNorm is folded" in card
    assert "no `wespeaker_avg_model.pt`: ThinResNet is not an architecture WeSpeaker has" in card

    # Registered: the alias points at a version whose source is the bundle logged with the trial's run.
    version = client.get_model_version_by_alias("lsv-exp", "chosen")
    assert str(version.version) == result["model_version"] and version.run_id == result["run_id"]
    assert version.source.endswith("/export") and version.tags["lsv.optuna_trial"] == str(result["trial"])
    logged = {a.path for a in client.list_artifacts(result["run_id"], "export")}
    assert "export/model.onnx" in logged and "export/infer.py" in logged and "export/wespeaker_avg_model.pt" not in logged


@pytest.mark.slow
def test_float_onnx_is_an_option(real_study: dict) -> None:
    import onnxruntime as ort

    from lsv_core.export.packed import load_packed

    out = real_study["root"] / "with_float"
    best = _best(real_study["config"])
    assert main(["export", str(real_study["toml"]), "--trial", str(best.number), "--out", str(out),
                 "--no-register", "--float-onnx"]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted([*BUNDLE_FILES, "model.float.onnx"])
    packed = load_packed(out / "model.packed.safetensors")
    x = torch.randn(2, 220, 80, generator=torch.Generator().manual_seed(3))
    session = ort.InferenceSession(str(out / "model.float.onnx"), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        assert np.abs(session.run(["embedding"], {"fbank": x.numpy()})[0] - packed(x).numpy()).max() <= 1e-4
    assert (out / "model.float.onnx").stat().st_size > (out / "model.onnx").stat().st_size


@pytest.mark.slow
def test_existing_folder_needs_force_and_only_a_bundle_is_replaced(real_study: dict,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    out = real_study["root"] / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    best = _best(real_study["config"])
    args = ["export", str(real_study["toml"]), "--trial", str(best.number), "--out", str(out), "--no-register"]
    assert main(args) == 2
    assert "exists" in capsys.readouterr().err and (out / "keep.txt").read_text() == "mine"
    # --force replaces only a bundle export wrote: a user's folder is never deleted.
    assert main([*args, "--force"]) == 2
    assert "not a bundle" in capsys.readouterr().err.replace("\n", " ") and (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()
    out.rmdir()
    assert main(args) == 0
    first = out.stat().st_ino
    assert main([*args, "--force"]) == 0  # a bundle it wrote: replaced (a new folder renamed into place)
    assert (out / "model.onnx").exists() and out.stat().st_ino != first
    assert json.loads((out / "recipe.json").read_text())["provenance"]["registered_model"] is None
    # A file the user put into the bundle makes it theirs: refused, nothing deleted.
    (out / "notes.txt").write_text("my notes")
    assert main([*args, "--force"]) == 2
    assert "notes.txt" in capsys.readouterr().err and (out / "notes.txt").read_text() == "my notes"


@pytest.mark.slow
@pytest.mark.parametrize("where", ["study", "inside", "contains"])
def test_out_never_overlaps_the_study_folder(real_study: dict, where: str, capsys: pytest.CaptureFixture[str]) -> None:
    study_dir = real_study["config"].study_dir
    before = sorted(str(p.relative_to(study_dir)) for p in study_dir.rglob("*"))
    out = {"study": study_dir, "inside": study_dir / "trials" / "export", "contains": study_dir.parent}[where]
    for force in ([], ["--force"]):
        assert main(["export", str(real_study["toml"]), "--knee", "--out", str(out), "--no-register", *force]) == 2
        err = capsys.readouterr().err.replace("\n", " ")
        assert "refused even with --force" in err, err
    assert sorted(str(p.relative_to(study_dir)) for p in study_dir.rglob("*")) == before
    assert not (study_dir / "trials" / "export").exists()


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
        # 1. Bytes: 64 extra bytes of tensors (as if written with another recipe) are refused before loading.
        with packed.open("ab") as f:
            f.write(b"\0" * 64)
        assert main(args) == 2
        err = capsys.readouterr().err.replace("\n", " ")
        assert "bytes of tensors" in err and "its recipe needs" in err, err
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
def test_recipe_that_does_not_match_the_model_is_refused(real_study: dict,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    best = _best(real_study["config"])
    packed = Path(best.packed_path)
    backup = real_study["root"] / "backup_arch.safetensors"
    shutil.copyfile(packed, backup)
    out = real_study["root"] / "mismatch"
    args = ["export", str(real_study["toml"]), "--trial", str(best.number), "--out", str(out), "--no-register",
            "--force"]
    try:
        with safe_open(str(packed), framework="pt") as f:
            meta = f.metadata()
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        # The same recipe over another architecture: its layers (conv1, layer1.0.conv1, ...) are not that model's.
        save_file(tensors, str(packed), metadata={**meta, "arch": json.dumps({"name": "Gemini_DF_ResNet60", "kwargs": {}})})
        assert main(args) == 2
        err = capsys.readouterr().err.replace("\n", " ")
        assert "does not match the model" in err and "not quantizable in Gemini_DF_ResNet60" in err, err
        # A file written for another recipe: refused by name, before its bytes are even looked at.
        other = {**json.loads(meta["recipe"]), "layers": {"conv1": 8}}
        save_file(tensors, str(packed), metadata={**meta, "recipe": json.dumps(other)})
        assert main(args) == 2
        assert "the study logged" in capsys.readouterr().err and not out.exists()
    finally:
        shutil.copyfile(backup, packed)


@pytest.mark.slow
def test_a_study_sized_by_tensor_bytes_exports_with_a_note(real_study: dict) -> None:
    import dataclasses

    from lsv_core.quant import BitRecipe, packed_tensor_bytes
    from search.results.export import verify_trial
    from search.results.tracking import StudyTracker

    config = real_study["config"]
    best = _best(config)
    from lsv_core.export.packed import read_packed_header
    from lsv_core.models import build_model

    arch = read_packed_header(best.packed_path)["arch"]
    tensors = packed_tensor_bytes(build_model(arch["name"], **arch["kwargs"]), BitRecipe.from_mapping(best.recipe))
    legacy = dataclasses.replace(best, size_bytes=tensors)  # what studies logged before this objective
    tracker = StudyTracker(config.mlflow_uri, config.study.name, artifact_root=config.study_dir / "mlartifacts")
    notes: list[str] = []
    checked = verify_trial(config, legacy, load_points(config), tracker, real_study["root"], notes=notes)
    assert checked.reeval.eer == best.eer and any("tensor bytes" in n for n in notes)
    with pytest.raises(ExportMismatch, match="the study logged size_bytes="):
        verify_trial(config, dataclasses.replace(best, size_bytes=tensors + 1), load_points(config), tracker,
                     real_study["root"])


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
