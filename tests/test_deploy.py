"""Deployable models: model.onnx keeps the codebooks and has exactly the predicted bytes, onnxruntime gives the
quantized torch model's embeddings at every bit width, the thresholds infer.py uses, the destination rules of a
bundle, and infer.py itself (in this environment, then in a fresh venv holding only its four packages).
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from torch import nn

from lsv_core.atomic import RefuseOverwrite
from lsv_core.errors import ConfigError
from lsv_core.export.bundle import MARKER_NAME, Accuracy, BundleFacts, check_out_dir, stage_bundle
from lsv_core.export.inference import INFER_REQUIREMENTS, onnx_session
from lsv_core.export.onnx_codebook import graph_template, save_codebook_onnx
from lsv_core.export.packed import save_packed
from lsv_core.metrics import compute_eer, compute_min_dcf
from lsv_core.metrics.thresholds import eer_threshold, min_dcf_threshold
from lsv_core.models import build_model
from lsv_core.quant import (
    BitRecipe,
    InitialCodebooks,
    KMQATConfig,
    latent_weight,
    packed_size_bytes,
    packed_tensor_bytes,
    quantizable_layers,
    quantize,
)
from tests.conftest import write_tone

QUICKSTART = {"m_channels": 8, "first_stride": 2, "embed_dim": 128}  # the quickstart baseline (lsv train)
CHOICES: list[object] = [None, (1, "static"), (1, "adaptive"), 2, 3, 4, 8]


def _trained_bn(model: nn.Module) -> nn.Module:
    """Non-trivial BatchNorm statistics, so the float tensors matter too."""
    model.train()
    with torch.no_grad():
        feat_dim = int(model.arch["kwargs"].get("feat_dim", 80))
        model(torch.randn(4, 120, feat_dim, generator=torch.Generator().manual_seed(9)))
    return model.eval()


def _random_recipes(model: nn.Module, n: int, seed: int) -> list[BitRecipe]:
    rng = np.random.default_rng(seed)
    layers = quantizable_layers(model)
    return [BitRecipe({name: CHOICES[int(rng.integers(len(CHOICES)))] for name in layers}) for _ in range(n)]


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


# -- size: predicted from shapes == bytes written -------------------------------------------------------------------
@pytest.mark.parametrize("arch", [
    ("ThinResNet", QUICKSTART),
    pytest.param(("ResNet34", {}), marks=pytest.mark.slow),
    pytest.param(("Gemini_DF_ResNet60", {}), marks=pytest.mark.slow),
    ("ECAPA_TDNN", {"channels": 16, "mfa_channels": 32, "embed_dim": 16, "global_context_att": True}),
    pytest.param(("CAMPPlus", {"embed_dim": 32, "growth_rate": 8, "bn_size": 2, "init_channels": 16}),
                 marks=pytest.mark.slow),
])
def test_predicted_size_is_the_written_file_to_the_byte(arch: tuple[str, dict], tmp_path: Path) -> None:
    name, kwargs = arch
    torch.manual_seed(0)
    base = _trained_bn(build_model(name, **kwargs))
    shapes_only = build_model(name, **kwargs)  # another instance: the prediction needs only the architecture
    modules = dict(base.named_modules())
    codebooks = InitialCodebooks({n: latent_weight(modules[n]) for n in quantizable_layers(base)})
    config = KMQATConfig(kmeans_max_iter=8)  # the codebook values do not change any byte count
    sizes = set()
    for i, recipe in enumerate(_random_recipes(base, 20, seed=len(name))):
        predicted = packed_size_bytes(shapes_only, recipe)
        model = quantize(copy.deepcopy(base), recipe, codebooks=codebooks, config=config).eval()
        path = save_codebook_onnx(model, tmp_path / f"{i}.onnx")
        assert os.path.getsize(path) == predicted, (i, recipe)
        assert packed_size_bytes(model) == predicted
        sizes.add(predicted)
        if i % 7 == 0:  # the file runs and computes the quantized model
            x = torch.randn(2, 160, base.arch["kwargs"]["feat_dim"], generator=torch.Generator().manual_seed(i))
            with torch.no_grad():
                want = model(x).numpy()
            got = onnx_session(path).run(["embedding"], {"fbank": x.numpy()})[0]
            assert _cosines(got, want).min() >= 0.9999
        path.unlink()
    assert len(sizes) == 20  # twenty different recipes, twenty different sizes


@pytest.mark.parametrize("kwargs", [{"two_emb_layer": True}, {"pooling_func": "ASTP"}, {"pooling_func": "TAP"},
                                    {"pooling_func": "TSDP", "feat_dim": 40}])
def test_architecture_variants(kwargs: dict, tmp_path: Path) -> None:
    """Heads and poolings that add BatchNorms not after a conv (kept as nodes) or attention convs."""
    torch.manual_seed(0)
    model = _trained_bn(build_model("ThinResNet", **kwargs))
    recipe = _random_recipes(model, 1, seed=5)[0]
    predicted = packed_size_bytes(build_model("ThinResNet", **kwargs), recipe)
    quantize(model, recipe, config=KMQATConfig(kmeans_max_iter=5))
    model.eval()
    path = save_codebook_onnx(model, tmp_path / "m.onnx")
    assert path.stat().st_size == predicted
    x = torch.randn(2, 150, model.arch["kwargs"]["feat_dim"], generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(x).numpy()
    assert _cosines(onnx_session(path).run(["embedding"], {"fbank": x.numpy()})[0], want).min() >= 0.9999


def test_size_query_needs_an_architecture() -> None:
    bare = nn.Sequential(nn.Conv1d(2, 2, 3))
    with pytest.raises(ConfigError, match="no .arch"):
        packed_size_bytes(bare, {})


# -- every bit width, ONNX vs torch ----------------------------------------------------------------------------------
@pytest.fixture
def all_widths(monkeypatch: pytest.MonkeyPatch) -> tuple[int, ...]:
    """Bits 1..8: the search allows 1, 2, 3, 4, 8; the format and the graph take any width up to 8."""
    from lsv_core.quant import recipe as recipe_module

    monkeypatch.setattr(recipe_module, "ALLOWED_BITS", tuple(range(1, 9)))
    return tuple(range(1, 9))


def _speech_like_fbank(tmp_path: Path) -> list[torch.Tensor]:
    """Real audio through the real feature pipeline: tones written as 16-bit wavs and read back."""
    from lsv_core.data.audio import read_audio
    from lsv_core.data.features import fbank

    out = []
    for i, (freq, secs) in enumerate(((180.0, 3.0), (240.0, 2.2), (330.0, 4.1))):
        wav = write_tone(tmp_path / f"tone{i}.wav", seconds=secs, freq=freq, seed=i)
        out.append(torch.from_numpy(fbank(read_audio(wav)))[None])
    return out


@pytest.mark.parametrize("mode", ["adaptive", "static"])
def test_every_bit_width_runs_in_onnxruntime_with_the_torch_embeddings(all_widths: tuple[int, ...], mode: str,
                                                                       tmp_path: Path) -> None:
    import onnx

    torch.manual_seed(1)
    base = _trained_bn(build_model("ThinResNet", **QUICKSTART))
    feats = _speech_like_fbank(tmp_path)
    mixed = BitRecipe({n: (b % 8) + 1 if (b % 8) else (1, mode) for b, n in enumerate(quantizable_layers(base))})
    for bits in [*all_widths, "mixed"]:
        if bits == "mixed":
            recipe = mixed
        else:
            recipe = BitRecipe.uniform(base, bits, mode if bits == 1 else None)
        model = quantize(copy.deepcopy(base), recipe).eval()
        path = save_codebook_onnx(model, tmp_path / f"{bits}.onnx", overwrite=True)
        size, tensors = path.stat().st_size, packed_tensor_bytes(model)
        assert size == packed_size_bytes(model)
        # Within 5 % of the packed tensors plus a fixed 4 kB of graph (BatchNorm folding saves 2 floats per
        # channel, which pays for most of the unpacking nodes; ResNet34 files are smaller than their tensors).
        assert size <= 1.05 * tensors + 4_000, (bits, size, tensors)
        session = onnx_session(path)
        for x in [*feats, torch.randn(3, 250, 80, generator=torch.Generator().manual_seed(3))]:
            with torch.no_grad():
                want = model(x).numpy()
            got = session.run(["embedding"], {"fbank": x.numpy()})[0]
            assert _cosines(got, want).min() >= 0.9999, bits
        if bits == 1:  # static binary stores one scale per layer, adaptive two levels
            inits = {t.name: t for t in onnx.load(str(path)).graph.initializer}
            for name in (slot.name for slot in graph_template(model).layers.values()):
                if mode == "static":
                    assert list(inits[f"{name}a"].dims) == [1] and f"{name}c" not in inits
                else:
                    assert list(inits[f"{name}c"].dims) == [2] and f"{name}a" not in inits


def test_onnxruntime_folds_the_dequantization_and_batchnorm(tmp_path: Path) -> None:
    """The codebook nodes read only initializers: a session turns them into float weights once, then fuses
    BatchNorm into the convolutions. The optimized graph is the float network's (bench/deploy.py times it)."""
    import onnx
    import onnxruntime as ort

    from lsv_core.export.onnx_export import export_onnx
    from lsv_core.export.wespeaker import dequantized_model

    model = _trained_bn(build_model("ThinResNet", **QUICKSTART))
    quantize(model, BitRecipe.uniform(model, 3).replace({"conv1": (1, "static"), "seg_1": 4}))
    model.eval()
    codebook = save_codebook_onnx(model, tmp_path / "codebook.onnx")
    float_path = export_onnx(dequantized_model(model), tmp_path / "float.onnx")
    ops = {}
    for label, path in (("codebook", codebook), ("float", float_path)):
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        options.optimized_model_filepath = str(tmp_path / f"{label}.opt.onnx")
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        ops[label] = sorted(n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node)
    assert "BitShift" not in ops["codebook"] and "BatchNormalization" not in ops["codebook"]
    assert ops["codebook"] == ops["float"]


# -- thresholds ------------------------------------------------------------------------------------------------------
def test_eer_and_min_dcf_thresholds() -> None:
    rng = np.random.default_rng(0)
    labels = np.r_[np.ones(400), np.zeros(4000)]
    scores = np.r_[rng.normal(0.6, 0.15, 400), rng.normal(0.1, 0.15, 4000)]
    eer = eer_threshold(scores, labels)
    assert abs(100 * eer.p_miss - compute_eer(scores, labels)) < 0.5 and abs(100 * eer.p_fa - compute_eer(scores, labels)) < 0.5
    assert (eer.n_target, eer.n_nontarget) == (400, 4000) and 0.1 < eer.threshold < 0.6
    dcf = min_dcf_threshold(scores, labels, p_target=0.01)
    realised = (0.01 * dcf.p_miss + 0.99 * dcf.p_fa) / 0.01
    assert realised == pytest.approx(compute_min_dcf(scores, labels, 0.01), abs=1e-12)
    assert dcf.threshold > eer.threshold  # a rare target: stricter than at the EER
    # The threshold is strictly between two distinct scores: the same decisions under tiny score changes.
    assert not np.any(np.isclose(scores, dcf.threshold, rtol=0, atol=1e-12))
    # Separable scores: the EER threshold separates them.
    sep = eer_threshold([0.9, 0.8, 0.1, 0.2], [1, 1, 0, 0])
    assert 0.2 <= sep.threshold <= 0.8 and sep.p_miss == sep.p_fa == 0.0
    with pytest.raises(ValueError, match="both target"):
        eer_threshold([0.1, 0.2], [1, 1])
    with pytest.raises(ValueError, match="p_target"):
        min_dcf_threshold(scores, labels, p_target=1.5)


# -- where a bundle may go ---------------------------------------------------------------------------------------------
def test_out_dir_rules(tmp_path: Path) -> None:
    study = tmp_path / "runs" / "study"
    study.mkdir(parents=True)
    (study / "optuna.db").write_text("precious")
    for out in (study, study / "export", tmp_path / "runs"):
        for force in (False, True):
            with pytest.raises(ConfigError, match="refused even with --force"):
                check_out_dir(out, force=force, protected=[study])
    link = tmp_path / "link"
    link.symlink_to(study)
    with pytest.raises(ConfigError, match=r"lies inside .*refused even with --force"):
        check_out_dir(link / "sub", force=True, protected=[study])
    assert check_out_dir(tmp_path / "new", force=False, protected=[study]) == tmp_path / "new"
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "a.txt").write_text("x")
    with pytest.raises(RefuseOverwrite):
        check_out_dir(mine, force=False)
    with pytest.raises(ConfigError, match="not a bundle"):
        check_out_dir(mine, force=True)
    (mine / MARKER_NAME).write_text(json.dumps({"format": "lsv-bundle/1", "files": ["a.txt"]}))
    assert check_out_dir(mine, force=True) == mine
    (mine / "b.txt").write_text("user's")
    with pytest.raises(ConfigError, match="b.txt"):
        check_out_dir(mine, force=True)
    plain_file = tmp_path / "file"
    plain_file.write_text("x")
    with pytest.raises(ConfigError, match="not a bundle"):
        check_out_dir(plain_file, force=True)
    assert (study / "optuna.db").read_text() == "precious"


# -- infer.py -------------------------------------------------------------------------------------------------------
def _bundle(tmp_path: Path, model: nn.Module, thresholds: dict) -> Path:
    packed = save_packed(model, tmp_path / "model.packed.safetensors")
    facts = BundleFacts(title="test", accuracy=Accuracy(eer=1.0, eer_ci_low=None, eer_ci_high=None, min_dcf_001=None,
                                                        reeval_eer=1.0, reeval_min_dcf_001=0.1, eer_tolerance=0.05,
                                                        n_eval_trials=10),
                        thresholds=thresholds, evaluated_on={"n_trials": 10})
    out = tmp_path / "bundle"
    with stage_bundle(model, packed, facts, near=out) as staged:
        staged.commit(out)
    return out


def _bad_wavs(root: Path) -> dict[str, Path]:
    root.mkdir(parents=True, exist_ok=True)
    bad = {"rate": write_tone(root / "8k.wav", sr=8000), "empty": root / "empty.wav", "corrupt": root / "corrupt.wav",
           "missing": root / "missing.wav"}
    sf.write(bad["empty"], np.zeros(0, dtype=np.float32), 16000)
    bad["corrupt"].write_bytes(b"RIFF\x00\x01garbage" * 10)
    return bad


BAD_MESSAGES = {"rate": "sample rate 8000 Hz", "empty": "empty audio", "corrupt": "unreadable audio",
                "missing": "no such file"}


def test_infer_script_in_process(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from lsv_core.data.audio import read_audio
    from lsv_core.data.features import fbank
    from lsv_core.export import infer_script

    model = _trained_bn(build_model("ThinResNet", **QUICKSTART))
    quantize(model, BitRecipe.uniform(model, 4))
    model.eval()
    points = {"eer": eer_threshold([0.9, 0.5, 0.2, 0.1], [1, 1, 0, 0]),
              "min_dcf": min_dcf_threshold([0.9, 0.5, 0.2, 0.1], [1, 1, 0, 0])}
    bundle = _bundle(tmp_path, model, points)
    a = write_tone(tmp_path / "a.wav", seconds=2.5, freq=200.0, seed=1)
    b = write_tone(tmp_path / "b.wav", seconds=3.0, freq=210.0, seed=2)
    # wav -> embedding equals the project's pipeline (read_audio, fbank, the quantized torch model).
    npy = tmp_path / "emb.npy"
    assert infer_script.main(["--bundle", str(bundle), "embed", str(a), str(b), "--out", str(npy)]) == 0
    with torch.no_grad():
        want = np.concatenate([model(torch.from_numpy(fbank(read_audio(w)))[None]).numpy() for w in (a, b)])
    assert _cosines(np.load(npy), want).min() >= 0.9999
    capsys.readouterr()
    assert infer_script.main(["--bundle", str(bundle), "score", str(a), str(b)]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["score"] == pytest.approx(float(_cosines(want[:1], want[1:])[0]), abs=1e-5)
    assert got["threshold"] == points["eer"].threshold and got["same_speaker"] == (got["score"] >= got["threshold"])
    assert infer_script.main(["--bundle", str(bundle), "score", str(a), str(b), "--operating-point", "min_dcf"]) == 0
    assert json.loads(capsys.readouterr().out)["threshold"] == points["min_dcf"].threshold
    assert infer_script.main(["--bundle", str(bundle), "score", str(a), str(b), "--operating-point", "x"]) == 2
    assert "choose one of ['eer', 'min_dcf']" in capsys.readouterr().err
    for kind, wav in _bad_wavs(tmp_path / "bad").items():
        assert infer_script.main(["--bundle", str(bundle), "score", str(a), str(wav)]) == 2, kind
        err = capsys.readouterr().err
        assert BAD_MESSAGES[kind] in err and str(wav) in err, (kind, err)


def _wheelhouse() -> Path | None:
    """Wheels of infer.py's packages fetched from PyPI beforehand (``make install`` puts them in
    ``.venv/wheels-infer``; tests run offline inside ../shared/loopback-only), else None (pip uses PyPI)."""
    env = os.environ.get("LSV_INFER_WHEELHOUSE")
    for candidate in ([Path(env)] if env else []) + [Path(sys.prefix) / "wheels-infer"]:
        if candidate.is_dir() and any(candidate.glob("onnxruntime-*.whl")):
            return candidate
    return None


def _fresh_venv(root: Path) -> Path:
    venv = root / "infer-venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    wheels = _wheelhouse()
    source = ["--no-index", "--find-links", str(wheels)] if wheels else []
    pip = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", *source, *INFER_REQUIREMENTS],
                         capture_output=True, text=True, timeout=900)
    if pip.returncode != 0:
        pytest.fail(f"pip could not install {INFER_REQUIREMENTS} into a fresh venv ({'wheelhouse ' + str(wheels) if wheels else 'PyPI'}); "
                    f"offline, fetch them first: pip download -d .venv/wheels-infer {' '.join(INFER_REQUIREMENTS)} "
                    f"(or set LSV_INFER_WHEELHOUSE).\n{pip.stderr[-3000:]}")
    return venv


@pytest.mark.slow
def test_infer_py_in_a_fresh_venv_scores_like_the_project(tiny_study_inputs: dict[str, Path], tmp_path: Path) -> None:
    from lsv_core.data.features import extract_features
    from lsv_core.data.manifest import read_data
    from lsv_core.data.trials import read_trials
    from lsv_core.evaluate import extract_embeddings, score
    from lsv_core.models import load_checkpoint

    venv = _fresh_venv(tmp_path)
    py = str(venv / "bin" / "python")
    probe = subprocess.run([py, "-c", "import importlib.util as u; print([m for m in ('torch', 'lsv_core', "
                            "'onnxruntime', 'kaldi_native_fbank', 'soundfile', 'numpy') if u.find_spec(m)])"],
                           capture_output=True, text=True, cwd=tmp_path, env={"PATH": os.environ["PATH"]})
    assert probe.stdout.strip() == "['onnxruntime', 'kaldi_native_fbank', 'soundfile', 'numpy']", probe

    # A quantized baseline, its trial scores by the project's own evaluation, and a bundle with their thresholds.
    model, _ = load_checkpoint(tiny_study_inputs["checkpoint"])
    quantize(model, BitRecipe.uniform(model, 4).replace({"conv1": 8, "seg_1": (1, "static")}))
    model.eval()
    data = read_data(tiny_study_inputs["corpus"] / "eval")
    trials = read_trials(tiny_study_inputs["corpus"] / "eval" / "trials", data)
    store = extract_features(data, utts=trials.utterances, cache_dir=tiny_study_inputs["cache"], progress=False)
    emb = extract_embeddings(model, store, trials.utterances, batch_size=1)  # full length, like infer.py
    scores = score(trials, emb)
    points = {"eer": eer_threshold(scores, trials.labels), "min_dcf": min_dcf_threshold(scores, trials.labels)}
    bundle = _bundle(tmp_path, model, points)

    env = {"PATH": os.environ["PATH"], "OMP_NUM_THREADS": "1"}
    picks = np.r_[np.flatnonzero(trials.labels)[:4], np.flatnonzero(trials.labels == 0)[:4]]
    for i in picks:
        enroll, test = data.utterances[trials.enroll[i]].path, data.utterances[trials.test[i]].path
        run = subprocess.run([py, str(bundle / "infer.py"), "score", str(enroll), str(test)],
                             capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
        assert run.returncode == 0, run.stderr
        got = json.loads(run.stdout)
        assert got["score"] == pytest.approx(float(scores[i]), abs=1e-4)
        assert got["threshold"] == points["eer"].threshold
        assert got["same_speaker"] == (got["score"] >= points["eer"].threshold)
    out = tmp_path / "emb.npy"
    wavs = [str(data.utterances[u].path) for u in trials.utterances[:3]]
    run = subprocess.run([py, str(bundle / "infer.py"), "embed", *wavs, "--out", str(out)], capture_output=True,
                         text=True, cwd=tmp_path, env=env, timeout=120)
    assert run.returncode == 0, run.stderr
    assert _cosines(np.load(out), np.stack([emb[u] for u in trials.utterances[:3]])).min() >= 0.9999
    for kind, wav in _bad_wavs(tmp_path / "bad").items():
        run = subprocess.run([py, str(bundle / "infer.py"), "embed", str(wav)], capture_output=True, text=True,
                             cwd=tmp_path, env=env, timeout=120)
        assert run.returncode == 2 and BAD_MESSAGES[kind] in run.stderr, (kind, run.stderr)
