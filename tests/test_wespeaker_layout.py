"""The exported ``wespeaker_avg_model.pt`` against **WeSpeaker's own model code**: written only for architectures
WeSpeaker has (the registry's ``wespeaker`` flag), it loads with ``strict=True`` into WeSpeaker's class and gives the
quantized model's embeddings; the quickstart's ThinResNet (stride-2 first stage, not a WeSpeaker network) gets no
such file and its card says why.

WeSpeaker's model files come from the ``wespeaker-unofficial`` wheel (installed ``--no-deps``; byte-identical to
upstream for resnet.py). Its package ``__init__`` imports heavy optional modules, so the model files are loaded
directly (``importlib``), with ``wespeaker.models.pooling_layers`` registered first (NOTES.md).
"""

from __future__ import annotations

import json
import types
from pathlib import Path

import pytest
import torch
from torch import nn

from lsv_core.errors import ConfigError
from lsv_core.export.bundle import MARKER_NAME, Accuracy, BundleFacts, stage_bundle
from lsv_core.export.packed import save_packed
from lsv_core.export.wespeaker import WESPEAKER_FILENAME, save_wespeaker_state_dict
from lsv_core.models import available_models, build_model, is_wespeaker_model
from lsv_core.quant import BitRecipe, quantizable_layers, quantize
from tests.wespeaker_reference import wespeaker_module

WESPEAKER_FILES = ("resnet", "gemini_dfresnet", "ecapa_tdnn", "campplus")


@pytest.fixture(scope="module")
def wespeaker() -> dict[str, types.ModuleType]:
    """WeSpeaker's model modules by file name, loaded from the wheel's files (tests/wespeaker_reference.py)."""
    return {name: wespeaker_module(name) for name in WESPEAKER_FILES}


def _wespeaker_class(modules: dict[str, types.ModuleType], name: str) -> object:
    """WeSpeaker's factory (or class) for a model name, as its ``get_speaker_model(name)`` would find it."""
    found = [getattr(m, name) for m in modules.values() if callable(getattr(m, name, None))]
    assert found, f"WeSpeaker has no model named {name!r}"
    return found[0]


def _embedding(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    return out[-1] if isinstance(out, tuple) else out  # WeSpeaker's ResNets return (embed_a, embed_b)


def _trained_bn(model: nn.Module) -> nn.Module:
    model.train()
    with torch.no_grad():
        model(torch.randn(4, 120, int(model.arch["kwargs"]["feat_dim"]), generator=torch.Generator().manual_seed(9)))
    return model.eval()


def _bundle(model: nn.Module, tmp_path: Path) -> Path:
    packed = save_packed(model, tmp_path / "model.packed.safetensors")
    facts = BundleFacts(title="test", accuracy=Accuracy(eer=1.0, eer_ci_low=None, eer_ci_high=None, min_dcf_001=None,
                                                        reeval_eer=1.0, reeval_min_dcf_001=0.1, eer_tolerance=0.05,
                                                        n_eval_trials=10),
                        thresholds={}, evaluated_on={"n_trials": 10})
    out = tmp_path / "bundle"
    with stage_bundle(model, packed, facts, near=out) as staged:
        staged.commit(out)
    return out


def test_the_registry_flags_exactly_wespeakers_models(wespeaker: dict[str, types.ModuleType]) -> None:
    """Every name flagged ``wespeaker`` is a model in WeSpeaker's code; ThinResNet (ours) is not flagged."""
    flagged = [n for n in available_models() if is_wespeaker_model(n)]
    assert {"ResNet34", "Gemini_DF_ResNet60"} <= set(flagged) and not is_wespeaker_model("ThinResNet")
    for name in flagged:
        _wespeaker_class(wespeaker, name)
    assert not is_wespeaker_model("NoSuchModel")


@pytest.mark.parametrize("name", [n for n in available_models() if is_wespeaker_model(n)])
def test_every_flagged_architecture_loads_strictly_into_wespeakers_class(
        name: str, wespeaker: dict[str, types.ModuleType]) -> None:
    ours = build_model(name, embed_dim=32).eval()
    # WeSpeaker's ECAPA_TDNN class fixes the aggregation width that ours takes as mfa_channels (1536 when flagged).
    kwargs = {k: v for k, v in ours.arch["kwargs"].items() if k != "mfa_channels"}
    theirs = _wespeaker_class(wespeaker, name)(**kwargs)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(2, 64, ours.arch["kwargs"]["feat_dim"], generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert float((_embedding(theirs.eval(), x) - ours(x)).abs().max()) <= 1e-5


@pytest.mark.parametrize("name", ["ResNet18", "Gemini_DF_ResNet60"])
def test_exported_state_dict_loads_into_wespeakers_class(name: str, wespeaker: dict[str, types.ModuleType],
                                                         tmp_path: Path) -> None:
    """The bundle's file, from a quantized model, in WeSpeaker's own class: strict load, the same embeddings."""
    model = _trained_bn(build_model(name, embed_dim=32))
    layers = quantizable_layers(model)
    widths = [2, 4, 8, None]
    quantize(model, BitRecipe({n: widths[i % len(widths)] for i, n in enumerate(layers)}))
    out = _bundle(model.eval(), tmp_path)
    assert WESPEAKER_FILENAME in json.loads((out / MARKER_NAME).read_text())["files"]
    state = torch.load(out / WESPEAKER_FILENAME, map_location="cpu", weights_only=True)
    theirs = _wespeaker_class(wespeaker, name)(**model.arch["kwargs"])
    theirs.load_state_dict(state, strict=True)
    theirs.eval()
    for frames in (150, 263):
        x = torch.randn(3, frames, 80, generator=torch.Generator().manual_seed(frames))
        with torch.no_grad():
            assert float((_embedding(theirs, x) - model(x)).abs().max()) <= 1e-5
    assert "`wespeaker_avg_model.pt` loads with `strict=True`" in (out / "model_card.md").read_text()


def test_thin_resnet_bundle_has_no_wespeaker_file_and_says_why(wespeaker: dict[str, types.ModuleType],
                                                               tmp_path: Path) -> None:
    """The quickstart network (ThinResNet, first_stride=2) is not a WeSpeaker architecture: WeSpeaker's ResNet of
    the same blocks and widths has other shapes after its stride-1 first stage, so no such file is written."""
    model = _trained_bn(build_model("ThinResNet", m_channels=8, first_stride=2, embed_dim=128))
    quantize(model, BitRecipe.uniform(model, 4))
    model.eval()
    out = _bundle(model, tmp_path)
    assert not (out / WESPEAKER_FILENAME).exists()
    assert WESPEAKER_FILENAME not in json.loads((out / MARKER_NAME).read_text())["files"]
    card = (out / "model_card.md").read_text()
    assert "no `wespeaker_avg_model.pt`: ThinResNet is not an architecture WeSpeaker has" in card
    assert "load_pretrained(\"wespeaker_avg_model.pt\"" not in card
    with pytest.raises(ConfigError, match="not an architecture WeSpeaker has"):
        save_wespeaker_state_dict(model, tmp_path / "x.pt")
    # Why: WeSpeaker's ResNet with the same blocks and widths does not take this state dict.
    kw = model.arch["kwargs"]
    resnet = wespeaker["resnet"]
    theirs = resnet.ResNet(resnet.BasicBlock, kw["num_blocks"], m_channels=kw["m_channels"], feat_dim=kw["feat_dim"],
                           embed_dim=kw["embed_dim"], pooling_func=kw["pooling_func"],
                           two_emb_layer=kw["two_emb_layer"])
    from lsv_core.quant import dequantized_state_dict

    with pytest.raises(RuntimeError, match="size mismatch"):
        theirs.load_state_dict(dequantized_state_dict(model), strict=True)
