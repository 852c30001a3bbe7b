"""ECAPA-TDNN (lsv_core/models/ecapa_tdnn.py) against WeSpeaker's own ecapa_tdnn.py, and everything the ResNets
get: codebooks on Conv1d and Linear, the deployable ONNX (exact size, onnxruntime, dynamic frames), the packed
file, the WeSpeaker state dict, Hessian traces, unit probes and search units."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from lsv_core.errors import CheckpointError, ConfigError
from lsv_core.export.inference import onnx_session
from lsv_core.export.onnx_codebook import graph_template, save_codebook_onnx
from lsv_core.export.packed import load_packed, save_packed
from lsv_core.export.wespeaker import save_wespeaker_state_dict
from lsv_core.models import build_model, load_pretrained
from lsv_core.models.registry import is_wespeaker_model
from lsv_core.quant import BitRecipe, KMQATConfig, packed_size_bytes, quantizable_layers, quantize
from lsv_core.quant.probe import probe_units
from lsv_core.quant.sensitivity import hessian_traces
from search.config import SpaceSection
from search.space import SearchSpace
from tests.wespeaker_reference import wespeaker_module

NAMES = ["ECAPA_TDNN_c512", "ECAPA_TDNN_c1024", "ECAPA_TDNN_GLOB_c512", "ECAPA_TDNN_GLOB_c1024"]
# CPU-sized: 32 channels (Res2Net groups of 4), a 96-wide aggregation; feat 40, embed 32.
SMALL = {"channels": 32, "feat_dim": 40, "embed_dim": 32, "mfa_channels": 96, "global_context_att": True}
CHOICES: list[object] = [None, (1, "static"), (1, "adaptive"), 2, 3, 4, 8]


def randomized(model: nn.Module, seed: int = 0) -> nn.Module:
    """Every float tensor random (BatchNorm statistics included, variances positive), in eval mode."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, tensor in model.state_dict().items():
            if tensor.is_floating_point():
                value = torch.randn(tensor.shape, generator=gen) * 0.2
                tensor.copy_(value.abs() + 0.5 if key.endswith("running_var") else value)
    return model.eval()


def _layout(model: nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    return [(k, tuple(v.shape)) for k, v in model.state_dict().items()]


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


# -- the model against WeSpeaker's code --------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_wespeaker_names_have_wespeakers_keys_and_shapes(name: str) -> None:
    wespeaker = getattr(wespeaker_module("ecapa_tdnn"), name)(feat_dim=24, embed_dim=16, emb_bn=True)
    ours = build_model(name, feat_dim=24, embed_dim=16, emb_bn=True)
    assert _layout(ours) == _layout(wespeaker)
    assert is_wespeaker_model(name) and not is_wespeaker_model("ECAPA_TDNN")
    assert ours.arch == {"name": name, "kwargs": {"feat_dim": 24, "embed_dim": 16, "pooling_func": "ASTP",
                                                  "emb_bn": True}}


@pytest.mark.parametrize(("global_context_att", "emb_bn", "pooling_func"),
                         [(False, False, "ASTP"), (True, True, "ASTP"), (False, False, "TSTP")])
def test_same_embeddings_as_wespeaker_for_the_same_weights(global_context_att: bool, emb_bn: bool,
                                                            pooling_func: str) -> None:
    kwargs = {"channels": 32, "feat_dim": 40, "embed_dim": 32, "pooling_func": pooling_func,
              "global_context_att": global_context_att, "emb_bn": emb_bn}
    wespeaker = randomized(wespeaker_module("ecapa_tdnn").ECAPA_TDNN(**kwargs), seed=1)
    ours = build_model("ECAPA_TDNN", **kwargs)  # WeSpeaker's fixed 1536-wide aggregation is our default
    ours.load_state_dict(wespeaker.state_dict(), strict=True)
    ours.eval()
    x = torch.randn(3, 137, 40, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = wespeaker(x)[-1]
        got = ours(x)
    assert got.shape == (3, 32)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_load_pretrained_reads_a_wespeaker_avg_model(tmp_path: Path) -> None:
    wespeaker = randomized(wespeaker_module("ecapa_tdnn").ECAPA_TDNN_GLOB_c512(feat_dim=24, embed_dim=16), seed=3)
    # As WeSpeaker's average_model.py saves it, with the AAM head and a DDP prefix.
    state = {f"module.{k}": v for k, v in wespeaker.state_dict().items()}
    state["module.projection.weight"] = torch.randn(7, 16)
    torch.save(state, tmp_path / "avg_model.pt")
    ours = load_pretrained(tmp_path / "avg_model.pt", "ECAPA_TDNN_GLOB_c512", feat_dim=24, embed_dim=16)
    x = torch.randn(2, 90, 24, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), wespeaker(x)[-1], rtol=0, atol=1e-6)
    with pytest.raises(CheckpointError, match=r"ECAPA_TDNN_c512 .* architecture(.|\n)*pool.linear1.weight: checkpoint \(128, 4608, 1\)"):
        load_pretrained(tmp_path / "avg_model.pt", "ECAPA_TDNN_c512", feat_dim=24, embed_dim=16)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"channels": 36}, "channels=36 should be a multiple of 8"),
    ({"emb_bn": 1}, "emb_bn=1 should be True or False"),
    ({"pooling_func": "MQMHASTP"}, "pooling_func='MQMHASTP'"),
    ({"two_emb_layer": True}, r"unknown argument\(s\) \['two_emb_layer'\]"),
])
def test_bad_arguments_are_named(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_model("ECAPA_TDNN", **kwargs)
    with pytest.raises(ConfigError, match=r"unknown argument\(s\) \['channels'\]"):
        build_model("ECAPA_TDNN_c512", channels=64)


# -- quantization and the deployable file -------------------------------------------------------------------------
def test_every_conv1d_and_linear_is_quantizable() -> None:
    model = build_model("ECAPA_TDNN", **SMALL)
    layers = quantizable_layers(model)
    modules = dict(model.named_modules())
    assert {type(modules[n]) for n in layers} == {nn.Conv1d, nn.Linear}
    # stem + 3 blocks x (2 1x1 convs + 7 Res2Net convs + 2 SE Linears) + aggregation conv + 2 pool convs + linear
    assert len(layers) == 1 + 3 * 11 + 1 + 2 + 1
    assert layers[0] == "layer1.conv" and layers[-1] == "linear"


def test_codebook_onnx_has_the_predicted_bytes_and_runs_with_dynamic_frames(tmp_path: Path) -> None:
    base = randomized(build_model("ECAPA_TDNN", **SMALL), seed=5)
    shapes_only = build_model("ECAPA_TDNN", **SMALL)
    rng = np.random.default_rng(0)
    layers = quantizable_layers(base)
    recipes = [BitRecipe.uniform(base, 4),
               *(BitRecipe({n: CHOICES[int(rng.integers(len(CHOICES)))] for n in layers}) for _ in range(2))]
    sizes = []
    for i, recipe in enumerate(recipes):
        predicted = packed_size_bytes(shapes_only, recipe)
        model = quantize(copy.deepcopy(base), recipe, config=KMQATConfig(kmeans_max_iter=8)).eval()
        path = save_codebook_onnx(model, tmp_path / f"{i}.onnx")
        assert os.path.getsize(path) == predicted
        sizes.append(predicted)
        session = onnx_session(path)
        for frames in (200, 331):  # two lengths: the frame axis is dynamic
            x = torch.randn(2, frames, 40, generator=torch.Generator().manual_seed(frames))
            with torch.no_grad():
                want = model(x).numpy()
            got = session.run(["embedding"], {"fbank": x.numpy()})[0]
            assert got.shape == want.shape and _cosines(got, want).min() >= 0.9999
    float_bytes = packed_size_bytes(shapes_only, {})
    assert float_bytes > max(sizes) and sizes[0] < 0.6 * float_bytes and len(set(sizes)) == len(sizes)
    # conv -> ReLU -> BatchNorm: nothing can be folded, and every BatchNorm stays a node.
    template = graph_template(base)
    assert all(slot.fold is None for slot in template.layers.values())
    assert sum(n.op_type == "BatchNormalization" for n in template.skeleton.graph.node) == 1 + 3 * 9 + 1


def test_packed_file_and_wespeaker_state_dict_of_a_quantized_ecapa(tmp_path: Path) -> None:
    kwargs = {"channels": 32, "feat_dim": 40, "embed_dim": 32, "global_context_att": True}  # 1536: WeSpeaker's
    model = randomized(build_model("ECAPA_TDNN", **kwargs), seed=6)
    quantize(model, BitRecipe.uniform(model, 3).replace({"linear": (1, "static")}), config=KMQATConfig(kmeans_max_iter=8))
    model.eval()
    x = torch.randn(2, 120, 40, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        want = model(x)
    loaded = load_packed(save_packed(model, tmp_path / "m.packed.safetensors"))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), want, rtol=0, atol=1e-6)
    # The dequantized state dict runs in WeSpeaker's own code and gives the quantized model's embeddings.
    save_wespeaker_state_dict(model, tmp_path / "avg_model.pt")
    wespeaker = wespeaker_module("ecapa_tdnn").ECAPA_TDNN(**kwargs)
    wespeaker.load_state_dict(torch.load(tmp_path / "avg_model.pt", weights_only=True), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(wespeaker.eval()(x)[-1], want, rtol=0, atol=1e-5)


def test_hessian_traces_and_unit_probes_cover_ecapa_units() -> None:
    model = randomized(build_model("ECAPA_TDNN", **{**SMALL, "embed_dim": 8}), seed=8)
    x = torch.randn(6, 80, 40, generator=torch.Generator().manual_seed(9))
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    head = nn.Linear(8, 3)

    def loss_fn(net: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return nn.functional.cross_entropy(head(net(batch[0])), batch[1])

    traces = hessian_traces(model, loss_fn, [(x, labels)], n_probes=2, seed=0)
    assert set(traces) == set(quantizable_layers(model))
    assert all(np.isfinite(v) for v in traces.values()) and any(v != 0 for v in traces.values())

    space = SearchSpace.build(model, SpaceSection(granularity="stage", bits=[1, 2, 4]))
    assert list(space.units) == ["layer1.conv", "layer2", "layer3", "layer4", "conv", "pool", "linear"]
    with torch.no_grad():
        reference = model(x)

    def score(quantized: nn.Module) -> float:  # distance from the float embeddings: more damage, higher
        with torch.no_grad():
            return float((quantized.eval()(x) - reference).pow(2).mean())

    probe = probe_units(model, space.unit_layers(), space.choices, score)
    assert set(probe.damage) == set(space.units)
    assert all(set(d) == {"1a", "2"} for d in probe.damage.values())
    assert all(np.isfinite(v) for d in probe.damage.values() for v in d.values())
    # 1 bit hurts more than 2 bits in all (random weights: not necessarily unit by unit)
    assert sum(d["1a"] for d in probe.damage.values()) > sum(d["2"] for d in probe.damage.values()) > 0


def test_block_granularity_splits_se_res2blocks_into_their_parts() -> None:
    model = build_model("ECAPA_TDNN", **SMALL)
    space = SearchSpace.build(model, SpaceSection(granularity="block"))
    assert space.units["layer2.se_res2block.1"] == [f"layer2.se_res2block.1.convs.{i}" for i in range(7)]
    assert space.units["layer3.se_res2block.3"] == ["layer3.se_res2block.3.linear1", "layer3.se_res2block.3.linear2"]
    assert space.units["pool"] == ["pool.linear1", "pool.linear2"]
    assert len(space.units) == 1 + 3 * 4 + 3


# -- the deployable bundle, infer.py and `lsv quantize --arch` ------------------------------------------------------
def test_infer_script_embeds_with_a_quantized_ecapa_bundle(tmp_path: Path) -> None:
    from lsv_core.data.audio import read_audio
    from lsv_core.data.features import fbank
    from lsv_core.export import infer_script
    from lsv_core.metrics.thresholds import eer_threshold
    from tests.conftest import write_tone
    from tests.test_deploy import _bundle

    model = randomized(build_model("ECAPA_TDNN", **{**SMALL, "feat_dim": 80}), seed=10)
    quantize(model, BitRecipe.uniform(model, 4), config=KMQATConfig(kmeans_max_iter=8))
    model.eval()
    bundle = _bundle(tmp_path, model, {"eer": eer_threshold([0.9, 0.5, 0.2, 0.1], [1, 1, 0, 0])})
    wavs = [write_tone(tmp_path / f"{i}.wav", seconds=2.0 + i, freq=200.0 + 10 * i, seed=i) for i in range(2)]
    npy = tmp_path / "emb.npy"
    assert infer_script.main(["--bundle", str(bundle), "embed", *map(str, wavs), "--out", str(npy)]) == 0
    with torch.no_grad():
        want = np.concatenate([model(torch.from_numpy(fbank(read_audio(w)))[None]).numpy() for w in wavs])
    assert _cosines(np.load(npy), want).min() >= 0.9999


def _train_speakers(corpus: Path) -> int:
    return len({line.split()[1] for line in (corpus / "train" / "utt2spk").read_text().splitlines() if line.strip()})


# About 30 s each on 2 cores (k-means over 6-15 M weights): slow; `lsv quantize --factory` (test_plugin.py) runs
# the same command path in the fast set, and load_pretrained is tested for every name above.
@pytest.mark.parametrize("name", [
    pytest.param("ECAPA_TDNN_GLOB_c512", marks=pytest.mark.slow),
    pytest.param("ECAPA_TDNN_c512", marks=pytest.mark.slow),
    pytest.param("ECAPA_TDNN_c1024", marks=pytest.mark.slow),
    pytest.param("ECAPA_TDNN_GLOB_c1024", marks=pytest.mark.slow),
    pytest.param("CAMPPlus", marks=pytest.mark.slow),
])
def test_lsv_quantize_arch_runs_on_a_wespeaker_checkpoint(name: str, tiny_study_inputs: dict[str, Path],
                                                          tmp_path: Path) -> None:
    from search.cli import main

    corpus, cache = tiny_study_inputs["corpus"], tiny_study_inputs["cache"]
    module = wespeaker_module("campplus" if name == "CAMPPlus" else "ecapa_tdnn")
    wespeaker = getattr(module, name)(feat_dim=80, embed_dim=32)
    # WeSpeaker's average_model.py output: its own network's state dict plus the AAM head.
    state = {**wespeaker.state_dict(), "projection.weight": torch.randn(_train_speakers(corpus), 32)}
    torch.save(state, tmp_path / "avg_model.pt")
    packed, report = tmp_path / "q.safetensors", tmp_path / "q.json"
    assert main(["quantize", "--model", str(tmp_path / "avg_model.pt"), "--arch", name, "--arch-kwargs",
                 '{"embed_dim": 32}', "--corpus", str(corpus), "--cache", str(cache), "--bits", "4", "--steps", "1",
                 "--batch-size", "4", "--device", "cpu", "--out", str(packed), "--json", str(report)]) == 0
    model = load_packed(packed)
    assert model.arch["name"] == name
    assert json.loads(report.read_text())["size_bytes"] == packed_size_bytes(model)


@pytest.mark.parametrize(("name", "kwargs"), [
    ("ECAPA_TDNN", SMALL),
    # CAM++'s codebook ONNX already runs at two frame counts in test_campplus.py; this trace costs 15-30 s.
    pytest.param("CAMPPlus", {"feat_dim": 40, "embed_dim": 32, "growth_rate": 8, "bn_size": 2, "init_channels": 16},
                 marks=pytest.mark.slow),
])
def test_float_onnx_export_has_a_dynamic_frame_axis(name: str, kwargs: dict, tmp_path: Path) -> None:
    from lsv_core.export.onnx_export import check_onnx, export_onnx

    model = randomized(build_model(name, **kwargs), seed=11)
    path = export_onnx(model, tmp_path / "float.onnx")
    assert check_onnx(path, model, lengths=(200, 317), atol=1e-4) <= 1e-4


def test_lsv_train_trains_a_small_ecapa(tiny_study_inputs: dict[str, Path], tmp_path: Path) -> None:
    from lsv_core.models import load_checkpoint
    from lsv_core.train import TrainConfig, train_baseline

    corpus = tiny_study_inputs["corpus"]
    kwargs = {"channels": 16, "mfa_channels": 48, "embed_dim": 16}
    config = TrainConfig(model="ECAPA_TDNN", model_kwargs=kwargs, steps=4, batch_size=8, device="cpu")
    train_baseline(config, corpus / "train", out=tmp_path / "ecapa.safetensors", progress=False,
                   cache_dir=tiny_study_inputs["cache"])
    model, meta = load_checkpoint(tmp_path / "ecapa.safetensors", with_extra=True)
    assert model.arch["name"] == "ECAPA_TDNN" and model.arch["kwargs"]["channels"] == 16
    assert meta["extra_tensors"]["weight"].shape == (_train_speakers(corpus), 16)  # the AAM head, for fine-tuning
