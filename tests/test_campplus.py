"""CAM++ (lsv_core/models/campplus.py) against WeSpeaker's own campplus.py, its codebook ONNX (exact size, BatchNorm
folding where a BatchNorm follows a conv, onnxruntime at frame counts with partial CAM segments), its WeSpeaker
state dict once quantized, and its search units."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from lsv_core.errors import ConfigError
from lsv_core.export.inference import onnx_session
from lsv_core.export.onnx_codebook import graph_template, save_codebook_onnx
from lsv_core.export.wespeaker import save_wespeaker_state_dict
from lsv_core.models import build_model, load_pretrained
from lsv_core.models.registry import is_wespeaker_model
from lsv_core.quant import BitRecipe, KMQATConfig, packed_size_bytes, quantizable_layers, quantize
from search.config import SpaceSection
from search.space import SearchSpace
from tests.test_ecapa import CHOICES, _cosines, _layout, randomized
from tests.wespeaker_reference import wespeaker_module

# CPU-sized: growth 8, bottleneck 16, 16 initial channels; the 12/24/16 dense layers are WeSpeaker's.
SMALL = {"feat_dim": 40, "embed_dim": 32, "growth_rate": 8, "bn_size": 2, "init_channels": 16}


def test_wespeakers_keys_and_shapes_at_its_recipe_settings() -> None:
    wespeaker = wespeaker_module("campplus").CAMPPlus(feat_dim=80, embed_dim=512, pooling_func="TSTP")
    ours = build_model("CAMPPlus")
    assert _layout(ours) == _layout(wespeaker)
    assert ours.arch["kwargs"]["embed_dim"] == 512 and is_wespeaker_model("CAMPPlus")


@pytest.mark.parametrize("config_str", ["batchnorm-relu", "batchnorm-prelu"])
def test_same_embeddings_as_wespeaker_for_the_same_weights(config_str: str) -> None:
    kwargs = {**SMALL, "config_str": config_str}
    wespeaker = randomized(wespeaker_module("campplus").CAMPPlus(**kwargs), seed=1)
    ours = build_model("CAMPPlus", **kwargs)
    ours.load_state_dict(wespeaker.state_dict(), strict=True)
    ours.eval()
    # 251 frames: 126 after the stride-2 TDNN layer, so the CAM layers see a partial 100-frame segment.
    x = torch.randn(2, 251, 40, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), wespeaker(x), rtol=0, atol=1e-5)


def test_load_pretrained_reads_a_wespeaker_avg_model(tmp_path: Path) -> None:
    wespeaker = randomized(wespeaker_module("campplus").CAMPPlus(**SMALL), seed=3)
    state = {**wespeaker.state_dict(), "projection.weight": torch.randn(5, 32)}
    torch.save(state, tmp_path / "avg_model.pt")
    ours = load_pretrained(tmp_path / "avg_model.pt", "CAMPPlus", **SMALL)
    x = torch.randn(2, 150, 40, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), wespeaker(x), rtol=0, atol=1e-5)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"feat_dim": 36}, "feat_dim=36 should be a multiple of 8"),
    ({"pooling_func": "ASTP"}, r"pooling_func='ASTP'; allowed: \['TAP', 'TSDP', 'TSTP'\]"),
    ({"config_str": "batchnorm-tanh"}, "config_str='batchnorm-tanh' should be '-'-joined names"),
    ({"growth_rate": 0}, "growth_rate=0 should be an int >= 1"),
])
def test_bad_arguments_are_named(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_model("CAMPPlus", **kwargs)


def test_codebook_onnx_exact_size_folds_and_runtime(tmp_path: Path) -> None:
    base = randomized(build_model("CAMPPlus", **SMALL), seed=5)
    layers = quantizable_layers(base)
    assert len(layers) == 12 + 1 + 4 * (12 + 24 + 16) + 3 + 1  # FCM, TDNN, dense layers, transits, embedding
    template = graph_template(base)
    folded = {name for name, slot in template.layers.items() if slot.fold is not None}
    # A BatchNorm right after a conv is folded (FCM, the first TDNN layer, each dense layer's bottleneck, the
    # last transit conv before out_nonlinear); the other pre-activation convs (BatchNorm before them), CAM
    # convs and the embedding conv (a Squeeze between it and its BatchNorm) are not.
    assert folded == {n for n in layers if n.startswith("head.") or n in ("xvector.tdnn.linear", "xvector.transit3.linear")
                      or n.endswith(".linear1") and ".tdnnd" in n and ".cam_layer." not in n}
    rng = np.random.default_rng(1)
    recipes = [BitRecipe.uniform(base, 4), BitRecipe({n: CHOICES[int(rng.integers(len(CHOICES)))] for n in layers})]
    for i, recipe in enumerate(recipes):
        predicted = packed_size_bytes(build_model("CAMPPlus", **SMALL), recipe)
        model = quantize(copy.deepcopy(base), recipe, config=KMQATConfig(kmeans_max_iter=5)).eval()
        path = save_codebook_onnx(model, tmp_path / f"{i}.onnx")
        assert os.path.getsize(path) == predicted
        session = onnx_session(path)
        for frames in (200, 251):
            x = torch.randn(2, frames, 40, generator=torch.Generator().manual_seed(frames))
            with torch.no_grad():
                want = model(x).numpy()
            assert _cosines(session.run(["embedding"], {"fbank": x.numpy()})[0], want).min() >= 0.9999
        if i == 0:  # the quantized model's WeSpeaker state dict runs in WeSpeaker's code
            save_wespeaker_state_dict(model, tmp_path / "avg_model.pt")
            wespeaker = wespeaker_module("campplus").CAMPPlus(**SMALL)
            wespeaker.load_state_dict(torch.load(tmp_path / "avg_model.pt", weights_only=True), strict=True)
            with torch.no_grad():
                assert _cosines(wespeaker.eval()(x).numpy(), want).min() >= 0.99999


def test_search_units_are_dense_layers_and_dense_blocks() -> None:
    model = build_model("CAMPPlus", **SMALL)
    block = SearchSpace.build(model, SpaceSection(granularity="block", tie_shortcuts=True))
    assert block.units["xvector.block2.tdnnd5"] == [
        "xvector.block2.tdnnd5.linear1", "xvector.block2.tdnnd5.cam_layer.linear_local",
        "xvector.block2.tdnnd5.cam_layer.linear1", "xvector.block2.tdnnd5.cam_layer.linear2"]
    assert block.units["head.layer1.0"] == ["head.layer1.0.conv1", "head.layer1.0.conv2"]
    assert block.tied == {"head.layer1.0.shortcut.0": "head.layer1.0.conv1",
                          "head.layer2.0.shortcut.0": "head.layer2.0.conv1"}
    stage = SearchSpace.build(model, SpaceSection(granularity="stage"))
    assert list(stage.units) == ["head.conv1", "head.layer1", "head.layer2", "head.conv2", "xvector.tdnn.linear",
                                 "xvector.block1", "xvector.transit1.linear", "xvector.block2",
                                 "xvector.transit2.linear", "xvector.block3", "xvector.transit3.linear",
                                 "xvector.dense.linear"]
    assert len(stage.units["xvector.block2"]) == 4 * 24


def test_embedding_layer_policy_finds_the_layers_after_pooling() -> None:
    from lsv_core.quant.recipe import QuantPolicy, apply_policy, embedding_layers

    campplus = build_model("CAMPPlus", **SMALL)
    ecapa = build_model("ECAPA_TDNN", channels=16, mfa_channels=32, embed_dim=16)
    resnet = build_model("ThinResNet", pooling_func="ASTP", two_emb_layer=True)
    assert embedding_layers(campplus) == ["xvector.dense.linear"]  # a 1x1 Conv1d on the pooled vector
    assert embedding_layers(ecapa) == ["linear"]  # not the attentive pooling's convs
    assert embedding_layers(resnet) == ["seg_1", "seg_2"]
    recipe = apply_policy(BitRecipe.uniform(campplus, 2), campplus, QuantPolicy(embedding_layers=8))
    assert recipe["xvector.dense.linear"].bits == 8 and recipe["xvector.transit3.linear"].bits == 2
