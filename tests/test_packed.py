"""Bit packing and the packed safetensors export (lsv_core/quant/bitpack.py, lsv_core/export/packed.py)."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import torch
from torch import nn

from lsv_core.atomic import RefuseOverwrite
from lsv_core.errors import CheckpointError, ConfigError
from lsv_core.export import load_packed, pack_bits, read_packed_header, save_packed, unpack_bits
from lsv_core.models import build_model
from lsv_core.quant import (
    ALLOWED_BITS,
    BitRecipe,
    is_quantized,
    packed_nbytes,
    packed_size_bytes,
    packed_tensor_bytes,
    packed_tensors,
    quantizable_layers,
    quantize,
    recipe_of,
)

# --------------------------------------------------------------------------------------------- bitpack


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("n", [0, 1, 7, 13, 1001])
def test_pack_unpack_round_trip_torch_and_numpy(bits: int, n: int) -> None:
    rng = np.random.default_rng(bits * 1000 + n)
    idx = rng.integers(0, 2**bits, size=n).astype(np.uint8)
    packed_np = pack_bits(idx, bits)
    packed_t = pack_bits(torch.from_numpy(idx), bits)
    assert packed_np.dtype == np.uint8 and packed_np.shape == (packed_nbytes(n, bits),) == (
        (n * bits + 7) // 8,
    )
    assert isinstance(packed_t, torch.Tensor) and packed_t.dtype == torch.uint8
    np.testing.assert_array_equal(packed_t.numpy(), packed_np)  # same bytes from both implementations
    np.testing.assert_array_equal(unpack_bits(packed_np, bits, n), idx)
    np.testing.assert_array_equal(unpack_bits(packed_t, bits, n).numpy(), idx)


def test_bit_layout_is_little_endian_lsb_first() -> None:
    # Indices 1..5 at 3 bits, each LSB first: stream 100 010 110 001 101; byte 0 holds stream bits 0-7
    # (bit 0 = least significant), byte 1 bits 8-14 -> 0b11010001, 0b01011000.
    packed = pack_bits(np.array([1, 2, 3, 4, 5]), 3)
    np.testing.assert_array_equal(packed, [0b11010001, 0b01011000])
    np.testing.assert_array_equal(pack_bits(torch.tensor([1, 0, 1, 1]), 1).numpy(), [0b1101])


def test_pack_accepts_any_shape_and_integer_dtype() -> None:
    idx = torch.randint(0, 16, (4, 3, 5), generator=torch.Generator().manual_seed(0))
    packed = pack_bits(idx, 4)
    assert torch.equal(unpack_bits(packed, 4, idx.numel()).long().reshape(idx.shape), idx)


def test_pack_errors() -> None:
    with pytest.raises(ValueError, match=r"indices should lie in \[0, 4\)"):
        pack_bits(np.array([0, 4]), 2)
    with pytest.raises(ValueError, match="bits=9"):
        pack_bits(np.array([0]), 9)
    with pytest.raises(ValueError, match="integers"):
        pack_bits(torch.tensor([0.5]), 2)
    with pytest.raises(ValueError, match="need 1"):
        unpack_bits(np.zeros(2, dtype=np.uint8), 3, 2)


# ---------------------------------------------------------------------------------------------- export


def fbank() -> torch.Tensor:
    return torch.randn(3, 50, 80, generator=torch.Generator().manual_seed(2))


def random_recipe(model: nn.Module, seed: int) -> BitRecipe:
    rng = np.random.default_rng(seed)
    choices: list[object] = [None, *[b for b in ALLOWED_BITS if b > 1], (1, "static"), (1, "adaptive")]
    return BitRecipe({n: choices[int(rng.integers(len(choices)))] for n in quantizable_layers(model)})


def header_bytes(path) -> int:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
    return 8 + n


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_save_load_round_trip_exact_outputs_and_size(tmp_path, seed: int) -> None:
    torch.manual_seed(seed)
    model = build_model("ThinResNet")
    # Give BatchNorm non-trivial statistics so that the float tensors matter too.
    model.train()
    with torch.no_grad():
        model(fbank())
    recipe = random_recipe(model, seed)
    quantize(model, recipe)
    model.eval()
    path = save_packed(model, tmp_path / "model.safetensors", metadata={"eer": 1.23, "seed": seed})
    assert path.stat().st_size == packed_tensor_bytes(model) + header_bytes(path)
    assert packed_tensor_bytes(model) == packed_tensor_bytes(build_model("ThinResNet"), recipe)

    loaded = load_packed(path)
    assert is_quantized(loaded) == bool(recipe) and recipe_of(loaded) == recipe and not loaded.training
    with torch.no_grad():
        assert torch.equal(loaded(fbank()), model(fbank()))
    header = read_packed_header(path)
    assert header["recipe"] == recipe and header["user"] == {"eer": 1.23, "seed": seed}
    assert header["arch"] == model.arch
    # Saving the reloaded model reproduces the same tensors.
    again = packed_tensors(loaded)
    original = packed_tensors(model)
    assert list(again) == list(original)
    assert all(torch.equal(again[k], original[k]) for k in original)


def test_float_model_round_trip(tmp_path) -> None:
    model = build_model("ThinResNet").eval()
    path = save_packed(model, tmp_path / "float.safetensors")
    assert path.stat().st_size == packed_tensor_bytes(model) + header_bytes(path)
    loaded = load_packed(path)
    assert not is_quantized(loaded)
    with torch.no_grad():
        assert torch.equal(loaded(fbank()), model(fbank()))


def test_refuses_overwrite(tmp_path) -> None:
    model = build_model("ThinResNet")
    quantize(model, BitRecipe.uniform(model, 2))
    path = save_packed(model, tmp_path / "m.safetensors")
    size = path.stat().st_size
    with pytest.raises(RefuseOverwrite):
        save_packed(model, path)
    assert path.stat().st_size == size
    quantize(model, BitRecipe.uniform(model, 4))
    save_packed(model, path, overwrite=True)
    assert path.stat().st_size > size
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]  # no temporary left behind


def test_loaded_model_keeps_training(tmp_path) -> None:
    model = build_model("ThinResNet")
    quantize(model, BitRecipe.uniform(model, 2).replace({"seg_1": (1, "adaptive")}))
    loaded = load_packed(save_packed(model, tmp_path / "m.safetensors"))
    loaded.train()
    loaded(fbank()).pow(2).mean().backward()
    assert loaded.seg_1.parametrizations.weight.original.grad is not None


def test_errors(tmp_path) -> None:
    model = build_model("ThinResNet")
    with pytest.raises(ConfigError, match="metadata"):
        save_packed(model, tmp_path / "a.safetensors", metadata={"x": object()})
    bare = nn.Sequential(nn.Linear(2, 2))
    with pytest.raises(ConfigError, match="arch"):
        save_packed(bare, tmp_path / "b.safetensors")
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="format"):
        load_packed(tmp_path / "other.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(CheckpointError):
        load_packed(tmp_path / "junk.safetensors")


def test_header_layers_describe_unpacking(tmp_path) -> None:
    model = build_model("ThinResNet")
    quantize(model, {"conv1": 3, "seg_1": (1, "static")})
    path = save_packed(model, tmp_path / "m.safetensors")
    layers = read_packed_header(path)["layers"]
    assert layers == {
        "conv1": {"shape": list(model.conv1.weight.shape), "bits": 3, "mode": None},
        "seg_1": {"shape": list(model.seg_1.weight.shape), "bits": 1, "mode": "static"},
    }
    assert json.loads(json.dumps(layers)) == layers


# ------------------------------------------------------------------------------------- scheme registry


def test_a_new_binary_mode_is_one_registered_class(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """The registry is the only place a layer spec meets its quantizer: one decorated class adds a mode
    that tokens, recipes, quantize, sizes, the packed file and the search space all accept."""
    from lsv_core.quant import recipe as recipe_module
    from lsv_core.quant.binary import StaticBinaryQuantizer
    from lsv_core.quant.recipe import LayerSpec, binary_modes, register_quantizer
    from search.config import SpaceSection
    from search.space import SearchSpace

    monkeypatch.setattr(recipe_module, "_QUANTIZERS", dict(recipe_module._QUANTIZERS))  # undone after the test

    @register_quantizer("median", token_letter="m")
    class MedianScale(StaticBinaryQuantizer):  # levels +-median|W|: a toy scheme, stored like the static one
        mode = "median"

        def forward(self, latent: torch.Tensor) -> torch.Tensor:
            sign = torch.where(latent >= 0, 1.0, -1.0).to(latent.dtype)
            return latent.abs().median() * sign

        def levels(self, latent: torch.Tensor) -> torch.Tensor:
            m = latent.detach().abs().median()
            return torch.stack([-m, m])

        def packed_codebook(self, latent: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"alpha": latent.detach().abs().median().reshape(1).float()}

    assert "median" in binary_modes() and LayerSpec(1, "median").token == "1m"
    assert LayerSpec.from_token("1m") == LayerSpec(1, "median")
    assert LayerSpec(1, "median").quantizer_class is MedianScale
    model = build_model("ThinResNet", m_channels=4, embed_dim=16)
    layer = quantizable_layers(model)[1]
    recipe = BitRecipe({layer: {"bits": 1, "mode": "median"}})
    quantize(model, recipe)
    assert recipe_of(model) == recipe
    path = save_packed(model, tmp_path / "m.safetensors")
    again = load_packed(path)
    x = torch.randn(2, 50, 80)
    with torch.no_grad():
        assert torch.equal(again.eval()(x), model.eval()(x))
    assert packed_size_bytes(model) == packed_size_bytes(build_model("ThinResNet", m_channels=4, embed_dim=16), recipe)
    space = SearchSpace.build(model, SpaceSection(bits=[1, 4], binary_modes=["median"], granularity="stage"))
    assert space.choices == ("1m", "4")
