"""Model plugins (lsv_core/models/plugin.py): docs/plugin_example.py's network named by its factory is quantized,
sized to the byte, exported to ONNX and run in onnxruntime, loaded back from the packed file, used by a study
config and by `lsv quantize --factory`; factories the project cannot serve are refused with the reason."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from lsv_core.errors import ConfigError
from lsv_core.export.inference import onnx_session
from lsv_core.export.onnx_codebook import save_codebook_onnx
from lsv_core.export.packed import load_packed, save_packed
from lsv_core.models import build_model
from lsv_core.quant import BitRecipe, KMQATConfig, packed_size_bytes, quantizable_layers, quantize
from search.cli import main
from search.config import parse_study_config
from tests.test_ecapa import CHOICES, _cosines

DOCS = Path(__file__).resolve().parents[1] / "docs"
FACTORY = "plugin_example:tiny_tdnn"
SMALL = {"feat_dim": 40, "channels": 16, "embed_dim": 16}


@pytest.fixture(autouse=True)
def _docs_importable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(DOCS))  # as PYTHONPATH=docs does for a user


# Factories the project must refuse (module-level, so "tests.test_plugin:NAME" imports them).
class _GRUNet(nn.Module):
    def __init__(self, feat_dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(feat_dim, 16)
        self.rnn = nn.GRU(16, 16, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rnn(self.proj(x))[0].mean(dim=1)


def gru_network(feat_dim: int = 40) -> nn.Module:
    return _GRUNet(feat_dim)


def frame_level_network(feat_dim: int = 40) -> nn.Module:
    return nn.Linear(feat_dim, 8)  # (B, T, F) -> (B, T, 8): no pooling, not an embedding


def no_feat_dim(channels: int = 8) -> nn.Module:
    return nn.Linear(channels, channels)


def not_a_module(feat_dim: int = 40) -> str:
    return "a string"


def test_the_example_network_is_quantized_sized_exported_and_reloaded(tmp_path: Path) -> None:
    model = build_model(FACTORY, **SMALL)
    assert model.arch == {"name": FACTORY, "kwargs": SMALL}
    layers = quantizable_layers(model)
    assert layers == ["frames.0", "frames.3", "frames.6", "embedding"]
    model.train()
    with torch.no_grad():  # non-trivial BatchNorm statistics
        model(torch.randn(4, 90, 40, generator=torch.Generator().manual_seed(0)))
    model.eval()
    rng = np.random.default_rng(2)
    recipes = [BitRecipe.uniform(model, 4), *(BitRecipe({n: CHOICES[int(rng.integers(len(CHOICES)))] for n in layers})
                                              for _ in range(3))]
    for i, recipe in enumerate(recipes):
        predicted = packed_size_bytes(build_model(FACTORY, **SMALL), recipe)
        quantized = quantize(copy.deepcopy(model), recipe, config=KMQATConfig(kmeans_max_iter=8)).eval()
        path = save_codebook_onnx(quantized, tmp_path / f"{i}.onnx")
        assert path.stat().st_size == predicted
        session = onnx_session(path)
        for frames in (120, 203):
            x = torch.randn(2, frames, 40, generator=torch.Generator().manual_seed(frames))
            with torch.no_grad():
                want = quantized(x).numpy()
            assert _cosines(session.run(["embedding"], {"fbank": x.numpy()})[0], want).min() >= 0.9999
        if i == 0:  # the packed file rebuilds the network through the factory
            loaded = load_packed(save_packed(quantized, tmp_path / "p.safetensors"))
            with torch.no_grad():
                torch.testing.assert_close(loaded(x), quantized(x), rtol=0, atol=1e-6)


@pytest.mark.parametrize(("factory", "kwargs", "message"), [
    ("tests.test_plugin:gru_network", {}, r"layer 'rnn' \(GRU\) holds parameters .* cannot be quantized or exported"),
    ("tests.test_plugin:frame_level_network", {}, r"should map fbank .* it returned \(2, 64, 8\)"),
    ("tests.test_plugin:no_feat_dim", {}, "should take a feat_dim argument"),
    ("tests.test_plugin:not_a_module", {}, "returned a str, not a torch.nn.Module"),
    ("tests.test_plugin:missing", {}, "has no attribute 'missing'"),
    ("no_such_package.nets:f", {}, "module 'no_such_package.nets' cannot be imported"),
    (FACTORY, {"width": 3}, r"arguments \['width'\] do not fit the factory"),
    (FACTORY, {"feat_dim": "80"}, "feat_dim='80' should be an int >= 1"),
])
def test_factories_the_project_cannot_serve_are_refused(factory: str, kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_model(factory, **kwargs)


def test_study_config_names_a_factory_and_validates_it() -> None:
    config = parse_study_config({"study": {"name": "p"}, "model": {"checkpoint": "m.pt", "factory": FACTORY,
                                                                   "arch_kwargs": SMALL}})
    assert config.model.architecture == FACTORY and config.workbench_spec().arch == FACTORY
    with pytest.raises(ConfigError, match=r"model\.factory \(got 'plugin_example:nope'\): .*has no attribute 'nope'"):
        parse_study_config({"study": {"name": "p"}, "model": {"factory": "plugin_example:nope"}})
    with pytest.raises(ConfigError, match=r"model\.factory \(got 'plugin_example'\): .*'package.module:function'"):
        parse_study_config({"study": {"name": "p"}, "model": {"factory": "plugin_example"}})
    with pytest.raises(ConfigError, match="give arch .* or factory .*, not both"):
        parse_study_config({"study": {"name": "p"}, "model": {"factory": FACTORY, "arch": "ResNet34"}})


def test_lsv_quantize_with_a_factory(tiny_study_inputs: dict[str, Path], tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    corpus, cache = tiny_study_inputs["corpus"], tiny_study_inputs["cache"]
    speakers = {line.split()[1] for line in (corpus / "train" / "utt2spk").read_text().splitlines() if line.strip()}
    kwargs = {"feat_dim": 80, "channels": 16, "embed_dim": 16}
    net = build_model(FACTORY, **kwargs)
    checkpoint = tmp_path / "tdnn.pt"  # a plain state dict with its AAM head, as WeSpeaker's avg_model.pt
    torch.save({**net.state_dict(), "projection.weight": torch.randn(len(speakers), 16)}, checkpoint)
    packed, report = tmp_path / "q.safetensors", tmp_path / "q.json"
    args = ["quantize", "--factory", FACTORY, "--arch-kwargs", json.dumps(kwargs), "--model", str(checkpoint),
            "--corpus", str(corpus), "--cache", str(cache), "--steps", "2", "--device", "cpu"]
    assert main([*args, "--bits", "4", "--out", str(packed), "--json", str(report)]) == 0
    result = json.loads(report.read_text())
    model = load_packed(packed)
    assert model.arch == {"name": FACTORY, "kwargs": kwargs}
    assert result["size_bytes"] == packed_size_bytes(model) and 0.0 <= result["eer"] <= 100.0
    capsys.readouterr()
    gru = ["--factory", "tests.test_plugin:gru_network", "--arch-kwargs", '{"feat_dim": 80}']
    assert main([*args[:1], *gru, *args[5:], "--bits", "4"]) == 2
    err = capsys.readouterr().err
    assert "--factory" in err and "layer 'rnn' (GRU)" in err
    assert main([*args[:2], "plugin_example:nope", *args[3:], "--bits", "4"]) == 2
    assert "has no attribute 'nope'" in capsys.readouterr().err


class _FFTNet(nn.Module):
    def __init__(self, feat_dim: int) -> None:
        super().__init__()
        self.embedding = nn.Linear(feat_dim, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embedding(torch.fft.rfft(x, dim=1).abs().mean(dim=1))  # rfft has no ONNX export


def fft_network(feat_dim: int = 40) -> nn.Module:
    return _FFTNet(feat_dim)


def test_a_network_without_an_onnx_export_has_no_size() -> None:
    model = build_model("tests.test_plugin:fft_network")  # it runs in torch, and quantizes
    quantize(model, BitRecipe.uniform(model, 4))
    with pytest.raises(ConfigError, match=r"tests.test_plugin:fft_network: cannot be exported to ONNX opset 18"):
        packed_size_bytes(model)


@pytest.mark.slow
@pytest.mark.parametrize("which", ["ECAPA_TDNN", "factory"])
def test_a_study_searches_ecapa_and_a_plugin_network(which: str, tiny_study_inputs: dict[str, Path], tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """End to end through Ray workers: they rebuild the network from its arch (a registered name, or the factory,
    importable in the workers through PYTHONPATH as a user would set it), fine-tune, size and pack each trial."""
    import optuna
    from optuna.trial import TrialState

    from lsv_core.models.checkpoint import load_checkpoint
    from lsv_core.train import TrainConfig, train_baseline
    from search.study.run import run_study
    from tests.conftest import study_raw_config

    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(DOCS), os.environ.get("PYTHONPATH", "")]))
    corpus = tiny_study_inputs["corpus"]
    if which == "factory":
        name, kwargs = FACTORY, {"feat_dim": 80, "channels": 16, "embed_dim": 16}
    else:
        name, kwargs = "ECAPA_TDNN", {"channels": 16, "mfa_channels": 32, "embed_dim": 16}
    ckpt = tmp_path / "base.safetensors"
    train_baseline(TrainConfig(model=name, model_kwargs=kwargs, steps=6, batch_size=8, device="cpu"),
                   corpus / "train", out=ckpt, progress=False, cache_dir=tiny_study_inputs["cache"])
    model, _ = load_checkpoint(ckpt)
    assert model.arch["name"] == name
    raw = study_raw_config(tiny_study_inputs, tmp_path, name="e", study={"n_trials": 4},
                           model={"checkpoint": str(ckpt)}, space={"granularity": "stage", "bits": [2, 4, 8]})
    cfg = parse_study_config(raw)
    run_study(cfg, progress=False)
    trials = optuna.load_study(study_name="e", storage=cfg.optuna_url).trials
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(complete) == 4
    units = {k.removeprefix("b:") for k in complete[0].params}
    if which == "factory":
        assert units == set(quantizable_layers(model))  # no blocks or stages in its names: one unit per layer
    else:
        assert units == {"layer1.conv", "layer2", "layer3", "layer4", "conv", "pool", "linear"}
    for t in complete:
        if "memoized_from" not in t.user_attrs:
            packed = load_packed(t.user_attrs["packed_path"])
            assert packed.arch["name"] == name and packed_size_bytes(packed) == t.values[1]
