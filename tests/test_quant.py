"""Bit recipes, KMQAT quantizers (codebook, static/adaptive binary) and size accounting (lsv_core/quant)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from lsv_core.errors import ConfigError
from lsv_core.models import build_model
from lsv_core.quant import (
    BitRecipe,
    KMQATConfig,
    LayerSpec,
    QuantPolicy,
    apply_policy,
    dequantized_state_dict,
    is_quantized,
    kmeans_1d,
    latent_weight,
    layer_codebooks,
    packed_size_bytes,
    packed_tensor_bytes,
    packed_tensors,
    quantizable_layers,
    quantize,
    quantizer_of,
    recipe_of,
    recluster_all,
)
from lsv_core.quant.binary import AdaptiveBinaryQuantizer, StaticBinaryQuantizer
from lsv_core.quant.codebook import CodebookQuantizer


class Toy(nn.Module):
    """A small embedder-like net with a training-only ``projection`` head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(4, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm1d(8)
        self.conv2 = nn.Conv1d(8, 8, 3, padding=1, bias=False)
        self.seg_1 = nn.Linear(8, 6)
        self.projection = nn.Linear(6, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.conv1(x)))
        return self.seg_1(self.conv2(h).mean(dim=-1))


@pytest.fixture
def thin() -> nn.Module:
    torch.manual_seed(0)
    return build_model("ThinResNet")


def fbank(batch: int = 2, frames: int = 40) -> torch.Tensor:
    return torch.randn(batch, frames, 80, generator=torch.Generator().manual_seed(1))


# ------------------------------------------------------------------------------------------------ recipes


def test_layer_spec_parsing_and_defaults() -> None:
    assert LayerSpec.parse(4) == LayerSpec(4)
    assert LayerSpec.parse((1, "static")) == LayerSpec(1, "static")
    assert LayerSpec.parse({"bits": 1, "mode": "adaptive"}) == LayerSpec(1, "adaptive")
    assert LayerSpec(1).mode == "adaptive"
    assert LayerSpec.parse(None) is None and LayerSpec.parse("float") is None
    with pytest.raises(ConfigError, match=r"bits=5 is not allowed; allowed bits: \[1, 2, 3, 4, 8\]"):
        LayerSpec(5)
    with pytest.raises(ConfigError, match="mode='ternary'.*static"):
        LayerSpec(1, "ternary")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="only applies to 1 bit"):
        LayerSpec(4, "static")
    with pytest.raises(ConfigError, match="recipe layer 'conv1'"):
        BitRecipe({"conv1": True})


def test_recipe_is_canonical_hashable_and_round_trips() -> None:
    a = BitRecipe({"seg_1": 4, "conv1": (1, "static"), "layer1.0.conv1": {"bits": 1}, "layer2.0.conv1": None})
    b = BitRecipe(
        {"layer1.0.conv1": LayerSpec(1, "adaptive"), "conv1": {"bits": 1, "mode": "static"}, "seg_1": 4}
    )
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1
    assert list(a) == ["conv1", "layer1.0.conv1", "seg_1"]  # sorted; float layers dropped
    assert a.to_json() == b.to_json() and a.digest() == b.digest()
    assert json.loads(a.to_json())["layers"]["conv1"] == {"bits": 1, "mode": "static"}
    assert BitRecipe.from_json(a.to_json()) == a
    assert BitRecipe.from_toml(a.to_toml()) == a
    assert BitRecipe.from_json('{"seg_1": 4}') == BitRecipe({"seg_1": 4})  # bare mapping
    # Unquoted dotted TOML keys become nested tables; they are flattened back.
    assert BitRecipe.from_toml("[layers]\nlayer1.0.conv1 = 4\n") == BitRecipe({"layer1.0.conv1": 4})
    assert a.digest() != a.replace({"seg_1": 8}).digest()
    assert a.replace({"seg_1": None}).bits("seg_1") is None
    with pytest.raises(AttributeError):
        a._items = ()  # type: ignore[misc]
    with pytest.raises(ConfigError, match="malformed"):
        BitRecipe.from_toml("[layers\n")


def test_recipe_save_load(tmp_path) -> None:
    r = BitRecipe({"conv1": 8, "seg_1": (1, "static")})
    for suffix in (".toml", ".json"):
        path = r.save(tmp_path / f"r{suffix}")
        assert BitRecipe.load(path) == r
    from lsv_core.atomic import RefuseOverwrite

    with pytest.raises(RefuseOverwrite):
        r.save(tmp_path / "r.toml")


def test_quantizable_layers_order_and_training_heads(thin: nn.Module) -> None:
    layers = quantizable_layers(thin)
    assert layers[0] == "conv1" and layers[-1] == "seg_1"
    assert "layer2.0.shortcut.0" in layers and len(layers) == 13
    assert quantizable_layers(Toy()) == ["conv1", "conv2", "seg_1"]  # projection head excluded


def test_validate_lists_valid_layers_and_allowed_bits(thin: nn.Module) -> None:
    with pytest.raises(ConfigError) as err:
        BitRecipe({"conv1": 4, "layer9.0.conv1": 2}).validate(thin)
    msg = str(err.value)
    assert "layer9.0.conv1" in msg and "conv1, layer1.0.conv1" in msg and "13 in all" in msg
    assert "allowed bits: [1, 2, 3, 4, 8]" in msg and "static" in msg
    with pytest.raises(ConfigError, match="projection"):
        BitRecipe({"projection": 4}).validate(Toy())


def test_uniform_and_keep(thin: nn.Module) -> None:
    r = BitRecipe.uniform(thin, 2, keep={"conv1": None, "seg_1": 8})
    assert "conv1" not in r and r.bits("seg_1") == 8 and r.bits("layer1.0.conv1") == 2 and len(r) == 12
    assert all(s == LayerSpec(1, "static") for s in BitRecipe.uniform(thin, 1, mode="static").values())
    with pytest.raises(ConfigError, match="keep"):
        BitRecipe.uniform(thin, 2, keep={"nope": None})


def test_apply_policy(thin: nn.Module) -> None:
    base = BitRecipe.uniform(thin, 2).replace({"layer2.0.conv1": (1, "static"), "layer3.0.conv1": None})
    r = apply_policy(base, thin, QuantPolicy(first_layer=None, embedding_layers=8, tie_shortcuts=True))
    assert "conv1" not in r and r.bits("seg_1") == 8
    assert r["layer2.0.shortcut.0"] == LayerSpec(1, "static")
    assert "layer3.0.shortcut.0" not in r  # tied to a float conv1
    assert r["layer4.0.shortcut.0"] == r["layer4.0.conv1"]
    assert apply_policy(base, thin, QuantPolicy()) == base
    with pytest.raises(ConfigError, match="QuantPolicy.first_layer"):
        QuantPolicy(first_layer=7)


# ---------------------------------------------------------------------------------------------- quantize


def test_quantized_weights_use_at_most_2_pow_b_values(thin: nn.Module) -> None:
    layers = quantizable_layers(thin)
    choices = [8, 4, 3, 2, (1, "static"), (1, "adaptive")]
    recipe = BitRecipe({name: choices[i % len(choices)] for i, name in enumerate(layers)})
    quantize(thin, recipe)
    assert is_quantized(thin) and recipe_of(thin) == recipe
    modules = dict(thin.named_modules())
    books = layer_codebooks(thin)
    for name, spec in recipe.items():
        w = modules[name].weight.detach()
        distinct = torch.unique(w).numel()
        if spec.bits == 1:
            assert distinct == 2, name
        else:
            assert distinct <= 2**spec.bits, name
        levels, index, bits = books[name]
        assert bits == spec.bits and levels.numel() == 2**spec.bits and index.dtype == torch.uint8
        assert torch.all(levels[1:] >= levels[:-1])
        assert torch.equal(levels[index.long()], w)


def test_codebook_initialised_by_kmeans_and_assignment_is_nearest() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(64, 32)
    w0 = layer.weight.detach().clone()
    quantize(layer_model := nn.Sequential(layer), {"0": 3})
    q = quantizer_of(layer)
    assert isinstance(q, CodebookQuantizer)
    c, labels = kmeans_1d(w0, 8)
    assert torch.equal(q.centroids.detach(), c)
    assert torch.equal(layer.weight.detach(), c[labels])
    assert layer_model[0] is layer


def test_assignment_is_canonical_when_levels_repeat() -> None:
    """36 weights at 8 bit: k-means leaves 220 repeated levels. A latent trained past the top level and the
    dequantized weight it stands for must pack to the same bytes (the trial's packed file and the exported
    model.onnx are written from these two)."""
    torch.manual_seed(0)
    conv = nn.Conv2d(1, 4, 3, bias=False)
    quantize(nn.Sequential(conv), {"0": 8})
    q = quantizer_of(conv)
    latent = latent_weight(conv)
    levels = q.levels(latent)
    assert torch.unique(levels).numel() == 36 < levels.numel()
    with torch.no_grad():
        latent[0, 0, 0, 0] = levels.max() + 0.01  # drifted above the top centroid while fine-tuning
        latent[0, 0, 0, 1] = levels.min() - 0.01
    index = q.assign(latent)
    assert torch.equal(levels[index.long()], conv.weight.detach())
    assert torch.equal(q.assign(conv.weight.detach()), index)
    first = torch.searchsorted(levels, levels[index.long()])
    assert torch.equal(index.long(), first)  # the first position holding each value


def test_ste_gradient_reaches_latent_weights_and_centroids() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8, bias=False))
    quantize(model, {"0": 2}, config=KMQATConfig(centroid_update="gradient"))
    layer = model[0]
    q = quantizer_of(layer)
    latent = latent_weight(layer)
    g = torch.randn(8, 16)
    (layer.weight * g).sum().backward()  # dL/dW_q = g
    assert torch.equal(latent.grad, g)  # straight-through
    _, index = layer_codebooks(model)["0"][:2]
    levels_order = torch.argsort(q.centroids.detach())
    expected = torch.zeros(4)
    for rank in range(4):  # shared-centroid gradient: sum of dL/dW_q over each cluster
        expected[levels_order[rank]] = g[index.long() == rank].sum()
    torch.testing.assert_close(q.centroids.grad, expected)


def test_training_step_moves_centroids_only_when_learned() -> None:
    x = torch.randn(32, 16, generator=torch.Generator().manual_seed(0))
    for update, moves in (("gradient", True), ("both", True), ("kmeans", False)):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(16, 8))
        quantize(model, {"0": 2}, config=KMQATConfig(centroid_update=update))
        q = quantizer_of(model[0])
        before = q.centroids.detach().clone()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        model(x).pow(2).sum().backward()
        opt.step()
        assert q.centroids.requires_grad == moves
        assert (not torch.equal(before, q.centroids.detach())) == moves, update


def test_optimizer_built_before_quantize_still_trains_the_latent_weight() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8))
    weight = model[0].weight
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    quantize(model, {"0": 4})
    assert latent_weight(model[0]) is weight
    before = weight.detach().clone()
    model(torch.randn(4, 16)).sum().backward()
    opt.step()
    assert not torch.equal(before, weight.detach())


def test_recluster_follows_moved_latent_weights() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 16))
    quantize(model, {"0": 2}, config=KMQATConfig(recluster_every=10))
    q = quantizer_of(model[0])
    before = q.centroids.detach().clone()
    with torch.no_grad():
        latent_weight(model[0]).mul_(3.0).add_(0.5)
    assert recluster_all(model, step=5) == 0  # not on the schedule
    assert torch.equal(q.centroids.detach(), before)
    assert recluster_all(model, step=10) == 1
    c, _ = kmeans_1d(latent_weight(model[0]).detach(), 4)
    assert torch.equal(q.centroids.detach(), c)
    # "gradient" mode does not re-cluster on the schedule, only when forced.
    model2 = nn.Sequential(nn.Linear(8, 4))
    quantize(model2, {"0": 2}, config=KMQATConfig(centroid_update="gradient"))
    assert recluster_all(model2) == 0 and recluster_all(model2, force=True) == 1


def test_static_binary_is_xnor_style() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8, bias=False))
    quantize(model, {"0": (1, "static")})
    layer, latent = model[0], latent_weight(model[0])
    assert isinstance(quantizer_of(layer), StaticBinaryQuantizer)
    alpha = latent.detach().abs().mean()
    expected = torch.where(latent.detach() >= 0, alpha, -alpha)
    torch.testing.assert_close(layer.weight.detach(), expected, rtol=0, atol=1e-7)
    assert list(quantizer_of(layer).parameters()) == []  # nothing learned besides the latent weights
    # Gradient: alpha * g (straight-through through sign) + sign/n * sum(g * sign) (through alpha).
    g = torch.randn(8, 16)
    (layer.weight * g).sum().backward()
    sign = torch.where(latent.detach() >= 0, 1.0, -1.0)
    torch.testing.assert_close(latent.grad, alpha * g + sign / sign.numel() * (g * sign).sum())
    # The scale follows the latent weights in every forward: no re-clustering needed.
    with torch.no_grad():
        latent.mul_(2.0)
    torch.testing.assert_close(layer.weight.detach().abs().max(), 2 * alpha)
    assert recluster_all(model, force=True) == 0


def test_adaptive_binary_levels_are_2_means_and_follow_the_centroid_switch() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 16, bias=False))
    with torch.no_grad():
        model[0].weight.add_(0.3)  # skewed weights: the adaptive levels need not be symmetric
    w0 = model[0].weight.detach().clone()
    quantize(model, {"0": (1, "adaptive")}, config=KMQATConfig(centroid_update="kmeans"))
    q = quantizer_of(model[0])
    # Default ("kmeans"): the levels are re-estimated by 2-means, not moved by the summed gradient.
    assert isinstance(q, AdaptiveBinaryQuantizer) and not q.centroids.requires_grad
    with torch.no_grad():
        latent_weight(model[0]).mul_(2.0)
    assert q.recluster(latent_weight(model[0]))
    torch.testing.assert_close(q.centroids.detach(), 2.0 * kmeans_1d(w0, 2)[0])
    model = nn.Sequential(nn.Linear(32, 16, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(w0)
    quantize(model, {"0": (1, "adaptive")}, config=KMQATConfig(centroid_update="gradient"))
    q = quantizer_of(model[0])
    assert isinstance(q, AdaptiveBinaryQuantizer) and q.centroids.requires_grad
    c, _ = kmeans_1d(w0, 2)
    assert torch.equal(q.centroids.detach(), c) and c[0] != -c[1]
    threshold = c.mean()
    expected = torch.where(w0 > threshold, c[1], c[0])
    assert torch.equal(model[0].weight.detach(), expected)
    g = torch.randn(16, 32)
    (model[0].weight * g).sum().backward()
    torch.testing.assert_close(
        q.centroids.grad, torch.stack([g[w0 <= threshold].sum(), g[w0 > threshold].sum()])
    )
    assert torch.equal(latent_weight(model[0]).grad, g)


def test_requantize_changes_spec_and_same_spec_keeps_state() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8))
    quantize(model, {"0": 4})
    q = quantizer_of(model[0])
    quantize(model, {"0": 4})
    assert quantizer_of(model[0]) is q
    quantize(model, {"0": (1, "static")})
    assert isinstance(quantizer_of(model[0]), StaticBinaryQuantizer)
    assert len(model[0].parametrizations["weight"]) == 1
    assert recipe_of(model) == BitRecipe({"0": (1, "static")})


def test_dequantized_state_dict_loads_into_a_fresh_model(thin: nn.Module) -> None:
    quantize(thin, BitRecipe.uniform(thin, 3))
    sd = dequantized_state_dict(thin)
    fresh = build_model("ThinResNet")
    assert list(sd) == list(fresh.state_dict())
    fresh.load_state_dict(sd, strict=True)
    thin.eval()
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(fbank()), thin(fbank()))


def test_quantize_rejects_unknown_layers(thin: nn.Module) -> None:
    with pytest.raises(ConfigError, match="valid layers"):
        quantize(thin, {"conv9": 4})
    assert not is_quantized(thin)


def test_config_validation() -> None:
    with pytest.raises(ConfigError, match="centroid_update='sgd'"):
        KMQATConfig(centroid_update="sgd")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="recluster_every"):
        KMQATConfig(recluster_every=-1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_quantized_model_trains_on_cuda(thin: nn.Module) -> None:
    thin.cuda()
    quantize(thin, BitRecipe.uniform(thin, 2).replace({"conv1": (1, "static"), "seg_1": (1, "adaptive")}))
    thin(fbank().cuda()).sum().backward()
    recluster_all(thin)
    assert all(p.device.type == "cuda" for p in thin.parameters())


# ---------------------------------------------------------------------------------------------------- size


def float_bytes(model: nn.Module) -> int:
    """float32 bytes of every parameter and BatchNorm running statistic."""
    n = sum(p.numel() for p in model.parameters())
    n += sum(b.numel() for name, b in model.named_buffers() if not name.endswith("num_batches_tracked"))
    return 4 * n


def test_size_of_float_and_quantized_models(thin: nn.Module) -> None:
    assert packed_tensor_bytes(thin, {}) == packed_tensor_bytes(thin) == float_bytes(thin)
    modules = dict(thin.named_modules())
    recipe = BitRecipe.uniform(thin, 4).replace({"conv1": (1, "static"), "seg_1": 3})
    expected = float_bytes(thin)
    for name, spec in recipe.items():
        n = modules[name].weight.numel()
        codebook = 1 if spec.mode == "static" else 2**spec.bits
        expected += math.ceil(n * spec.bits / 8) + 4 * codebook - 4 * n
    assert packed_tensor_bytes(thin, recipe) == expected
    predicted = packed_size_bytes(build_model("ThinResNet"), recipe)  # shapes only, no k-means
    quantize(thin, recipe)
    tensors = packed_tensors(thin)
    assert sum(t.nbytes for t in tensors.values()) == packed_tensor_bytes(thin) == expected
    # The size objective is the deployable file: those tensors plus the graph that dequantizes them.
    from lsv_core.export.onnx_codebook import codebook_onnx_bytes

    assert packed_size_bytes(thin) == predicted == len(codebook_onnx_bytes(thin))
    assert expected < predicted < expected + 12_000
    assert not any(k.endswith("num_batches_tracked") for k in tensors)
    assert tensors["conv1.weight.alpha"].shape == (1,) and tensors["seg_1.weight.codebook"].shape == (8,)


def test_size_is_additive_per_layer(thin: nn.Module) -> None:
    base = packed_size_bytes(thin, {})
    layers = quantizable_layers(thin)
    rng = np.random.default_rng(0)
    recipe = BitRecipe({n: int(rng.choice([2, 3, 4, 8])) for n in layers})
    delta = sum(packed_size_bytes(thin, {n: s}) - base for n, s in recipe.items())
    assert packed_size_bytes(thin, recipe) == base + delta


def test_training_head_is_not_counted() -> None:
    toy = Toy()
    head = sum(p.numel() for p in toy.projection.parameters())
    assert packed_tensor_bytes(toy) == float_bytes(toy) - 4 * head
    assert not any(k.startswith("projection.") for k in packed_tensors(toy))


def test_resnet34_uniform_4bit_is_about_8x_smaller() -> None:
    model = build_model("ResNet34")
    full = packed_size_bytes(model, {})
    four = packed_size_bytes(model, BitRecipe.uniform(model, 4))
    assert 26.0e6 < full < 27.0e6  # WeSpeaker: 26.5 MB in fp32 (docs/method.md)
    assert 7.5 < full / four < 8.0  # ~3.35 MB at 4 bits, BatchNorm and biases in float32
