"""Tests for lsv_core.models: WeSpeaker key layout, shapes, loading and our checkpoint format.

Expected keys/shapes are written out by hand from WeSpeaker's source (wespeaker/models/resnet.py,
gemini_dfresnet.py, pooling_layers.py at wenet-e2e/wespeaker master). Key counts include BatchNorm's
``num_batches_tracked``, which WeSpeaker's ``torch.save(model.state_dict())`` checkpoints also hold:
conv1 + bn1 = 6 keys; a BasicBlock 12 (+6 with a projection shortcut); an inverted bottleneck 18; each
Gemini downsampling layer 6; seg_1 2; with two_emb_layer seg_bn_1 3 (affine=False) + seg_2 2.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from lsv_core.atomic import RefuseOverwrite
from lsv_core.errors import CheckpointError, ConfigError
from lsv_core.models import (
    AAMSoftmax,
    available_models,
    build_model,
    load_checkpoint,
    load_pretrained,
    save_checkpoint,
)
from lsv_core.models.pooling import TSTP

SCALAR: tuple[int, ...] = ()

# name -> (kwargs, WeSpeaker key count, {key: shape}, keys that must be absent)
LAYOUTS: dict[str, tuple[dict, int, dict[str, tuple[int, ...]], list[str]]] = {
    "ResNet18": (
        {"feat_dim": 80, "embed_dim": 256, "two_emb_layer": False},
        6 + 8 * 12 + 3 * 6 + 2,  # 122
        {
            "conv1.weight": (32, 1, 3, 3),
            "bn1.running_var": (32,),
            "layer1.1.conv2.weight": (32, 32, 3, 3),
            "layer2.0.conv1.weight": (64, 32, 3, 3),
            "layer2.0.shortcut.0.weight": (64, 32, 1, 1),
            "layer4.1.conv2.weight": (256, 256, 3, 3),
            "seg_1.weight": (256, 5120),
        },
        ["layer1.0.shortcut.0.weight", "layer4.2.conv1.weight", "seg_2.weight"],
    ),
    "ResNet34": (
        {"feat_dim": 80, "embed_dim": 256, "two_emb_layer": False},
        6 + 16 * 12 + 3 * 6 + 2,  # 218
        {
            "conv1.weight": (32, 1, 3, 3),
            "bn1.weight": (32,),
            "bn1.bias": (32,),
            "bn1.running_mean": (32,),
            "bn1.num_batches_tracked": SCALAR,
            "layer1.0.conv1.weight": (32, 32, 3, 3),
            "layer1.2.bn2.running_mean": (32,),
            "layer2.0.conv1.weight": (64, 32, 3, 3),
            "layer2.0.shortcut.0.weight": (64, 32, 1, 1),
            "layer2.0.shortcut.1.running_var": (64,),
            "layer2.3.conv2.weight": (64, 64, 3, 3),
            "layer3.0.shortcut.0.weight": (128, 64, 1, 1),
            "layer3.5.bn1.weight": (128,),
            "layer4.0.shortcut.0.weight": (256, 128, 1, 1),
            "layer4.2.conv2.weight": (256, 256, 3, 3),
            "layer4.2.bn2.num_batches_tracked": SCALAR,
            "seg_1.weight": (256, 5120),
            "seg_1.bias": (256,),
        },
        ["layer1.0.shortcut.0.weight", "layer2.1.shortcut.0.weight", "seg_bn_1.running_mean", "seg_2.weight"],
    ),
    "Gemini_DF_ResNet60": (
        {"feat_dim": 80, "embed_dim": 256, "two_emb_layer": False},
        6 + 4 * 6 + 18 * 18 + 2,  # 356
        {
            "downsample_layers.0.0.weight": (32, 1, 3, 3),
            "downsample_layers.0.1.running_mean": (32,),
            "downsample_layers.1.0.weight": (32, 32, 3, 3),
            "downsample_layers.2.0.weight": (64, 32, 3, 3),
            "downsample_layers.4.0.weight": (256, 128, 3, 3),
            "downsample_layers.4.1.num_batches_tracked": SCALAR,
            "stages.0.0.conv1.weight": (128, 32, 1, 1),
            "stages.0.0.conv2.weight": (128, 1, 3, 3),  # depthwise
            "stages.0.0.conv3.weight": (32, 128, 1, 1),
            "stages.2.8.conv3.weight": (128, 512, 1, 1),
            "stages.3.2.bn3.weight": (256,),
            "seg_1.weight": (256, 2560),
        },
        ["downsample_layers.5.0.weight", "stages.2.9.conv1.weight", "downsample_layers.0.2.weight"],
    ),
    "Gemini_DF_ResNet114": (
        {"feat_dim": 80, "embed_dim": 256, "two_emb_layer": False},
        6 + 4 * 6 + 36 * 18 + 2,  # 680
        {
            "downsample_layers.0.0.weight": (32, 1, 3, 3),
            "stages.1.2.conv2.weight": (256, 1, 3, 3),
            "stages.2.26.conv1.weight": (512, 128, 1, 1),
            "stages.3.2.bn3.running_var": (256,),
            "seg_1.weight": (256, 2560),
        },
        ["stages.2.27.conv1.weight"],
    ),
    "ThinResNet": (
        {},
        6 + 4 * 12 + 3 * 6 + 2,  # 74
        {
            "conv1.weight": (8, 1, 3, 3),
            "layer1.0.conv1.weight": (8, 8, 3, 3),
            "layer2.0.shortcut.0.weight": (16, 8, 1, 1),
            "layer4.0.shortcut.0.weight": (64, 32, 1, 1),
            "seg_1.weight": (128, 1280),
        },
        ["layer1.0.shortcut.0.weight", "layer1.1.conv1.weight"],
    ),
}


def _randomize_bn(model: torch.nn.Module, seed: int = 0) -> None:
    """Non-trivial running stats so eval-mode outputs depend on every buffer."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)


@pytest.fixture(scope="module")
def fbank() -> torch.Tensor:
    return torch.randn(2, 200, 80, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_forward_shape(name: str, fbank: torch.Tensor) -> None:
    kwargs = LAYOUTS[name][0]
    model = build_model(name, **kwargs).eval()
    with torch.no_grad():
        emb = model(fbank)
    assert emb.shape == (2, model.arch["kwargs"]["embed_dim"])
    assert torch.isfinite(emb).all()


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_wespeaker_key_layout(name: str) -> None:
    kwargs, count, shapes, absent = LAYOUTS[name]
    state = build_model(name, **kwargs).state_dict()
    for key, shape in shapes.items():
        assert key in state, key
        assert tuple(state[key].shape) == shape, key
    for key in absent:
        assert key not in state, key
    assert len(state) == count
    keys = list(state)
    assert keys[-2:] == ["seg_1.weight", "seg_1.bias"]


def test_resnet34_two_emb_layer_and_astp_keys() -> None:
    two = build_model("ResNet34", feat_dim=80, embed_dim=256, two_emb_layer=True).state_dict()
    assert list(two)[-5:] == [
        "seg_bn_1.running_mean",
        "seg_bn_1.running_var",
        "seg_bn_1.num_batches_tracked",
        "seg_2.weight",
        "seg_2.bias",
    ]
    assert "seg_bn_1.weight" not in two  # BatchNorm1d(affine=False)
    assert tuple(two["seg_2.weight"].shape) == (256, 256)
    assert len(two) == 218 + 5
    astp = build_model("ResNet34", feat_dim=80, embed_dim=256, pooling_func="ASTP").state_dict()
    assert tuple(astp["pool.linear1.weight"].shape) == (128, 2560, 1)
    assert tuple(astp["pool.linear2.weight"].shape) == (2560, 128, 1)
    assert len(astp) == 218 + 4


def test_parameter_counts_match_published() -> None:
    def millions(name: str, **kw: object) -> float:
        return sum(p.numel() for p in build_model(name, **kw).parameters()) / 1e6

    # WeSpeaker READMEs list ResNet34-TSTP-emb256 as 6.63M; an early v2 table says 6.700M, which is
    # exactly the two_emb_layer=True count (seg_bn_1 + seg_2 add 65,792 parameters).
    assert millions("ResNet34", feat_dim=80, embed_dim=256, two_emb_layer=False) == pytest.approx(
        6.63, abs=0.01
    )
    assert millions("ResNet34", feat_dim=80, embed_dim=256, two_emb_layer=True) == pytest.approx(
        6.70, abs=0.01
    )
    # Golden Gemini README: Gemini DF-ResNet60 4.05M.
    assert millions("Gemini_DF_ResNet60") == pytest.approx(4.05, abs=0.01)


def test_scoring_embedding_is_wespeaker_last_output(fbank: torch.Tensor) -> None:
    model = build_model("ThinResNet", two_emb_layer=True).eval()
    with torch.no_grad():
        embed_a, embed_b = model.embeddings(fbank[:, :64])
        out = model(fbank[:, :64])
    assert embed_b is not None
    torch.testing.assert_close(out, embed_b)  # WeSpeaker scores outputs[-1]
    one = build_model("ThinResNet").eval()
    with torch.no_grad():
        embed_a, embed_b = one.embeddings(fbank[:, :64])
        torch.testing.assert_close(one(fbank[:, :64]), embed_a)
    assert embed_b is None


def test_tstp_matches_wespeaker_statistics() -> None:
    x = torch.randn(2, 4, 3, 17)
    stats = TSTP(in_dim=12)(x)
    mean = x.mean(dim=-1).flatten(1)  # channel-major flatten, as WeSpeaker
    std = torch.sqrt(torch.var(x, dim=-1) + 1e-7).flatten(1)
    torch.testing.assert_close(stats, torch.cat((mean, std), dim=1))


def test_input_is_not_modified(fbank: torch.Tensor) -> None:
    x = fbank[:, :64].clone()
    build_model("ThinResNet").eval()(x)
    assert x.shape == (2, 64, 80)


def test_arch_round_trip() -> None:
    model = build_model("ThinResNet", m_channels=4, num_blocks=(1, 2, 1, 1), embed_dim=32)
    arch = json.loads(json.dumps(model.arch))
    assert arch == {
        "name": "ThinResNet",
        "kwargs": {
            "m_channels": 4,
            "num_blocks": [1, 2, 1, 1],
            "feat_dim": 80,
            "embed_dim": 32,
            "pooling_func": "TSTP",
            "two_emb_layer": False,
            "first_stride": 1,
        },
    }
    rebuilt = build_model(arch["name"], **arch["kwargs"])
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {
        k: v.shape for k, v in model.state_dict().items()
    }
    assert build_model("ResNet34").arch["kwargs"] == {
        "feat_dim": 80,
        "embed_dim": 256,
        "pooling_func": "TSTP",
        "two_emb_layer": False,
    }


def test_config_errors_name_argument_and_allowed_values() -> None:
    with pytest.raises(ConfigError, match="'ResNet35'.*ResNet34"):
        build_model("ResNet35")
    assert {"ResNet18", "ResNet34", "Gemini_DF_ResNet60", "Gemini_DF_ResNet114", "ThinResNet"} <= set(
        available_models()
    )
    with pytest.raises(ConfigError, match="pooling_func='MEAN'.*TSTP"):
        build_model("ResNet34", pooling_func="MEAN")
    with pytest.raises(ConfigError, match="m_channels"):
        build_model("ResNet34", m_channels=16)  # WeSpeaker's ResNet34 factory has no width argument
    with pytest.raises(ConfigError, match="num_blocks"):
        build_model("ThinResNet", num_blocks=[1, 1, 1])
    with pytest.raises(ConfigError, match="two_emb_layer"):
        build_model("ThinResNet", two_emb_layer=1)
    with pytest.raises(ConfigError, match="feat_dim=4"):
        build_model("ThinResNet", feat_dim=4)


def test_load_pretrained_wespeaker_avg_model(tmp_path, fbank: torch.Tensor) -> None:
    source = build_model("ResNet34", feat_dim=80, embed_dim=256, two_emb_layer=False)
    _randomize_bn(source)
    state = dict(source.state_dict())
    state["projection.weight"] = torch.randn(5994, 256)  # VoxCeleb2 ArcMargin head, training only
    path = tmp_path / "avg_model.pt"
    torch.save(state, path)

    model = load_pretrained(path, "ResNet34", feat_dim=80, embed_dim=256, two_emb_layer=False)
    assert not model.training
    for key, value in source.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    with torch.no_grad():
        torch.testing.assert_close(model(fbank[:1, :100]), source.eval()(fbank[:1, :100]))


def test_load_pretrained_strips_ddp_prefix(tmp_path) -> None:
    source = build_model("ThinResNet")
    path = tmp_path / "model_10.pt"
    torch.save({f"module.{k}": v for k, v in source.state_dict().items()}, path)
    model = load_pretrained(path, "ThinResNet")
    assert torch.equal(model.state_dict()["seg_1.weight"], source.state_dict()["seg_1.weight"])


def test_load_pretrained_reports_missing_unexpected_and_shape(tmp_path) -> None:
    state = dict(build_model("ThinResNet").state_dict())
    del state["layer2.0.shortcut.0.weight"]
    state["seg_3.weight"] = torch.zeros(3)
    state["seg_1.weight"] = torch.zeros(64, 1280)
    path = tmp_path / "bad.pt"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as err:
        load_pretrained(path, "ThinResNet")
    message = str(err.value)
    assert "missing keys (1): layer2.0.shortcut.0.weight" in message
    assert "unexpected keys (1): seg_3.weight" in message
    assert "seg_1.weight: checkpoint (64, 1280) vs model (128, 1280)" in message
    assert str(path) in message


def test_load_pretrained_missing_file(tmp_path) -> None:
    path = tmp_path / "nope" / "avg_model.pt"
    with pytest.raises(CheckpointError, match="avg_model.pt"):
        load_pretrained(path, "ThinResNet")


def test_checkpoint_round_trip(tmp_path, fbank: torch.Tensor) -> None:
    model = build_model("ThinResNet", two_emb_layer=True, pooling_func="ASTP")
    _randomize_bn(model)
    model.eval()
    head = AAMSoftmax(128, 7)
    path = tmp_path / "baseline.safetensors"
    written = save_checkpoint(
        model, path, metadata={"epoch": 3, "eer_percent": 4.5}, extra_tensors=head.state_dict()
    )
    assert written == path

    loaded, meta = load_checkpoint(path)
    assert meta == {"epoch": 3, "eer_percent": 4.5}
    assert loaded.arch == model.arch
    assert not loaded.training
    with torch.no_grad():
        assert torch.equal(loaded(fbank[:, :64]), model(fbank[:, :64]))

    _, meta = load_checkpoint(path, with_extra=True)
    assert torch.equal(meta["extra_tensors"]["weight"], head.weight.detach())

    with pytest.raises(RefuseOverwrite):
        save_checkpoint(model, path)
    save_checkpoint(model, path, overwrite=True)
    assert load_checkpoint(path, with_extra=True)[1] == {"extra_tensors": {}}


def test_checkpoint_saves_shared_and_non_contiguous_tensors(tmp_path) -> None:
    model = build_model("ThinResNet", two_emb_layer=True)
    # safetensors refuses shared storage and non-contiguous tensors unless save_checkpoint clones them.
    with torch.no_grad():
        model.seg_2.weight.data = torch.randn(128, 128).t()
    model.seg_2.bias = model.seg_1.bias
    save_checkpoint(model, tmp_path / "tied.safetensors")
    loaded, _ = load_checkpoint(tmp_path / "tied.safetensors")
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_checkpoint_errors(tmp_path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.safetensors")
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all")
    with pytest.raises(CheckpointError, match="corrupt.safetensors"):
        load_checkpoint(corrupt)
    with pytest.raises(ConfigError, match="arch"):
        save_checkpoint(torch.nn.Linear(2, 2), tmp_path / "x.safetensors")
    with pytest.raises(ConfigError, match="JSON"):
        save_checkpoint(build_model("ThinResNet"), tmp_path / "y.safetensors", metadata={"bad": object()})
    assert not (tmp_path / "y.safetensors").exists()


def test_aam_softmax_margin_reduces_target_logit() -> None:
    torch.manual_seed(0)
    emb = torch.randn(6, 16)
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    head = AAMSoftmax(16, 5, margin=0.0, scale=32.0)
    plain = head(emb, labels)
    cosine = head.cosine(emb)
    torch.testing.assert_close(plain, 32.0 * cosine)

    head.update(0.2)
    margined = head(emb, labels)
    rows = torch.arange(6)
    target_cos = cosine[rows, labels]
    expected = 32.0 * torch.cos(torch.acos(target_cos) + 0.2)
    torch.testing.assert_close(margined[rows, labels], expected, rtol=1e-4, atol=1e-4)
    assert (margined[rows, labels] < plain[rows, labels]).all()
    mask = torch.ones_like(plain, dtype=torch.bool)
    mask[rows, labels] = False
    torch.testing.assert_close(margined[mask], plain[mask])
    assert math.isclose(head.margin, 0.2)
    loss = torch.nn.functional.cross_entropy(margined, labels)
    loss.backward()
    assert torch.isfinite(head.weight.grad).all()


def test_thin_resnet_first_stride_halves_resolution() -> None:
    full = build_model("ThinResNet", m_channels=4)
    fast = build_model("ThinResNet", m_channels=4, first_stride=2)
    # The strided first block gains a projection shortcut, exactly as WeSpeaker's later stages have.
    extra = set(fast.state_dict()) - set(full.state_dict())
    assert set(full.state_dict()) <= set(fast.state_dict())
    assert extra and all(k.startswith("layer1.0.shortcut.") for k in extra)
    # Frequency is halved once more before pooling: seg_1 sees half the statistics.
    assert fast.seg_1.weight.shape[1] * 2 == full.seg_1.weight.shape[1]
    assert fast(torch.randn(2, 200, 80)).shape == (2, 128)
    with pytest.raises(ConfigError, match="first_stride=3"):
        build_model("ThinResNet", first_stride=3)
