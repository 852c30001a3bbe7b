"""MSFT: stage plans, callback order, progressive quantization, early stop, one-shot ablation."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import pytest
import torch

from lsv_core.data.features import extract_features
from lsv_core.data.manifest import read_kaldi_dir
from lsv_core.data.trials import read_trials
from lsv_core.errors import ConfigError
from lsv_core.models import AAMSoftmax, build_model
from lsv_core.quant import BitRecipe, quantizable_layers
from lsv_core.quant.codebook import KMQATConfig
from lsv_core.quant.msft import FineTuneData, MsftSchedule, StageMetrics, msft, plan_stages
from lsv_core.quant.quantize import layer_codebooks, recipe_of


@pytest.fixture
def tiny(kaldi_dir: Path, tmp_path: Path) -> tuple[torch.nn.Module, FineTuneData]:
    data = read_kaldi_dir(kaldi_dir)
    store = extract_features(data, workers=1, progress=False)
    trials_file = tmp_path / "trials"
    trials_file.write_text("spkA-0 spkA-1 target\nspkA-0 spkB-1 nontarget\nspkB-0 spkB-2 target\n"
                           "spkB-0 spkA-2 nontarget\n")
    trials = read_trials(trials_file, data)
    spk = {s: i for i, s in enumerate(data.speakers)}
    torch.manual_seed(0)
    model = build_model("ThinResNet", m_channels=4, embed_dim=16, first_stride=2)
    head = AAMSoftmax(16, len(spk))
    ft = FineTuneData(store, {u.utt: spk[u.speaker] for u in data}, head, store, trials)
    return model, ft


def mixed_recipe(model: torch.nn.Module) -> BitRecipe:
    layers = quantizable_layers(model)
    bits = [4, 2, (1, "adaptive"), 8]
    return BitRecipe({name: bits[i % 4] for i, name in enumerate(layers)})


def test_plan_stages_orders(tiny: tuple[torch.nn.Module, FineTuneData]) -> None:
    model, _ = tiny
    recipe = mixed_recipe(model)
    layers = quantizable_layers(model)
    by_bits = plan_stages(model, recipe, "bits")
    assert [recipe[g[0]].bits for g in by_bits] == [1, 2, 4, 8]
    assert all(len({recipe[n].bits for n in g}) == 1 for g in by_bits)
    depth = plan_stages(model, recipe, "depth", n_groups=3)
    assert len(depth) == 3 and [n for g in depth for n in g] == layers
    sens = {n: float(-i) for i, n in enumerate(layers)}  # deepest is least sensitive
    by_sens = plan_stages(model, recipe, "sensitivity", n_groups=2, sensitivity=sens)
    assert by_sens[0][0] == layers[-1] and by_sens[-1][-1] == layers[0]
    assert plan_stages(model, recipe, "one_shot") == [layers]
    with pytest.raises(ConfigError, match="needs per-layer sensitivities"):
        plan_stages(model, recipe, "sensitivity")
    with pytest.raises(ConfigError, match="order='random'"):
        MsftSchedule(order="random")  # type: ignore[arg-type]


def test_msft_callback_order_and_progressive_quantization(tiny: tuple[torch.nn.Module, FineTuneData]) -> None:
    model, data = tiny
    recipe = mixed_recipe(model)
    seen: list[tuple[int, list[str], frozenset[str]]] = []

    def callback(stage: int, m: StageMetrics) -> bool:
        seen.append((stage, m.layers, frozenset(recipe_of(model))))
        assert m.eer is not None and 0.0 <= m.eer <= 100.0
        return False

    schedule = MsftSchedule(total_steps=8, batch_size=4, crop_frames=50, lr=0.01)
    result = msft(model, recipe, data, schedule, callback=callback)
    plan = plan_stages(model, recipe, "bits")
    assert [s for s, _, _ in seen] == list(range(len(plan)))
    assert [layers for _, layers, _ in seen] == plan
    cumulative: set[str] = set()
    for (_, _layers, quantized), group in zip(seen, plan, strict=True):
        cumulative |= set(group)
        assert quantized == cumulative  # only this stage's layers were added
    assert recipe_of(model) == recipe
    assert sum(s.steps for s in result.stages) == 8 and not result.stopped_early


def test_msft_callback_can_stop_early(tiny: tuple[torch.nn.Module, FineTuneData]) -> None:
    model, data = tiny
    recipe = mixed_recipe(model)
    result = msft(model, recipe, data, MsftSchedule(total_steps=4, batch_size=4, crop_frames=50),
                  callback=lambda stage, m: stage == 1)
    assert result.stopped_early and len(result.stages) == 2
    assert len(recipe_of(model)) < len(recipe)


def test_one_shot_is_one_stage_with_all_steps(tiny: tuple[torch.nn.Module, FineTuneData]) -> None:
    model, data = tiny
    result = msft(model, mixed_recipe(model), data,
                  MsftSchedule(order="one_shot", total_steps=6, batch_size=4, crop_frames=50))
    assert len(result.stages) == 1 and result.final.steps == 6
    assert recipe_of(model) == mixed_recipe(model)


def test_intermediate_stages_are_scored_on_cut_utterances(tiny: tuple[torch.nn.Module, FineTuneData]) -> None:
    from itertools import combinations

    from lsv_core.data.trials import Trials
    from lsv_core.evaluate import evaluate

    model, data = tiny
    utts = sorted(data.eval.utts)  # every pair: enough trials for cut and full scores to give distinct EERs
    pairs = list(combinations(utts, 2))
    labels = [int(a.split("-")[0] == b.split("-")[0]) for a, b in pairs]
    data.trials = Trials([a for a, _ in pairs], [b for _, b in pairs], torch.tensor(labels).numpy(), "all pairs")
    seen: list[tuple[float | None, float, float]] = []

    def callback(stage: int, m: StageMetrics) -> bool:
        cut = evaluate(model, data.eval, data.trials, n_boot=0, max_frames=40).eer
        full = evaluate(model, data.eval, data.trials, n_boot=0).eer
        seen.append((m.eer, cut, full))
        return False

    msft(model, mixed_recipe(model), data, MsftSchedule(total_steps=0, stage_eval_frames=40), callback=callback)
    *middle, last = seen
    assert all(eer == cut for eer, cut, _ in middle)
    assert last[0] == last[2]  # the final EER always uses full-length utterances
    assert any(cut != full for _, cut, full in seen)  # the cut really changes the scores here
    with pytest.raises(ConfigError, match="stage_eval_frames"):
        MsftSchedule(stage_eval_frames=0)


def test_no_recluster_after_the_last_optimizer_step(tiny: tuple[torch.nn.Module, FineTuneData]) -> None:
    """Codebooks re-generated after the final step would be evaluated without any training against them
    (the quickstart's largest source of seed-to-seed noise): a schedule whose re-cluster falls on the last
    step ends with the same codebooks as no re-clustering, while a mid-run re-cluster still happens."""
    model, data = tiny
    recipe = BitRecipe.uniform(model, 2)

    def codebooks_after(recluster_every: int) -> dict[str, torch.Tensor]:
        m = copy.deepcopy(model)
        d = dataclasses.replace(data, head=copy.deepcopy(data.head), eval=None, trials=None)
        schedule = MsftSchedule(total_steps=8, batch_size=4, crop_frames=50, lr=0.05, order="one_shot",
                                kmqat=KMQATConfig(recluster_every=recluster_every))
        msft(m, recipe, d, schedule)
        return {name: levels for name, (levels, _, _) in layer_codebooks(m).items()}

    never, at_end, midway = codebooks_after(0), codebooks_after(8), codebooks_after(4)
    assert never.keys() == at_end.keys() == midway.keys()
    assert all(torch.equal(never[n], at_end[n]) for n in never)
    assert any(not torch.equal(never[n], midway[n]) for n in never)
