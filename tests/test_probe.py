"""Unit probes (lsv_core.quant.probe) and the "probe" sampler built on them: which widths are probed,
how the others are estimated, probes of a real thin ResNet scored on a real espeak-ng corpus, and the
sampler driven through a real Optuna SQLite study against a proxy objective it does not know."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from lsv_core.errors import ConfigError, LsvError
from lsv_core.quant import BitRecipe, packed_size_bytes
from lsv_core.quant.probe import ProbeResult, context_token, estimated_damage, probe_tokens, probe_units
from lsv_core.quant.quantize import recipe_of
from lsv_core.quant.sensitivity import quantization_errors, state_dict_digest
from search.cluster.storage import SAMPLERS
from search.results.pareto import hypervolume
from search.results.record import save_record, stored_record
from search.samplers.prior import ProbePriorSampler, _calibrate, unit_table
from tests.test_samplers import drive, make_study, proxy_objective, thin_model


# -- which widths, and the estimate of the others ----------------------------------------------------------
def test_context_is_4_bit_or_the_nearest_multi_bit_choice_and_1_bit_is_always_probed() -> None:
    assert context_token(("1a", "2", "3", "4", "8")) == "4"
    assert probe_tokens(("1a", "2", "3", "4", "8"), "4") == ("1a", "2")
    assert context_token(("1a", "1s", "2", "8")) == "2"
    assert probe_tokens(("1a", "1s", "2", "8"), "2") == ("1a", "1s")
    assert context_token(("8",)) == "8" and probe_tokens(("8",), "8") == ()
    with pytest.raises(ConfigError, match="multi-bit choice"):
        context_token(("1a", "1s"))


def test_unprobed_widths_follow_the_units_kmeans_error_and_1_bit_is_never_extrapolated() -> None:
    probe = ProbeResult("4", 5.0, {"a": {"1a": 9.0, "2": 1.0}, "b": {"1a": 3.0, "2": -0.2}})
    errors = {"a": {2: 10.0, 3: 4.0, 4: 2.0, 8: 0.0}, "b": {2: 6.0, 3: 3.0, 4: 1.0, 8: 0.5}}
    est = estimated_damage(probe, errors, ("1a", "2", "3", "4", "8"))
    assert est["a"] == pytest.approx({"1a": 9.0, "2": 1.0, "3": 0.25, "4": 0.0, "8": -0.25})
    # A probe that measured no damage (noise below 0) gives a zero slope, not a negative one.
    assert est["b"] == pytest.approx({"1a": 3.0, "2": -0.2, "3": 0.0, "4": 0.0, "8": 0.0})
    with pytest.raises(ConfigError, match="never extrapolated"):
        estimated_damage(probe, errors, ("1a", "1s", "2", "4"))
    assert ProbeResult.from_dict(probe.to_dict()) == probe
    with pytest.raises(ConfigError, match="not a probe result"):
        ProbeResult.from_dict({"context": "4"})


def test_calibration_is_monotone_and_exact_on_monotone_data() -> None:
    assert _calibrate([1.0, 1.0], [2.0, 3.0]) is None  # one distinct score: nothing to calibrate
    xs, ys = _calibrate([0.0, 1.0, 2.0], [5.0, 6.0, 9.0])
    assert np.interp([0.0, 1.0, 2.0, 1.5], xs, ys) == pytest.approx([5.0, 6.0, 9.0, 7.5])
    xs, ys = _calibrate([0.0, 1.0, 2.0, 3.0], [5.0, 7.0, 6.0, 9.0])  # a violation is pooled
    assert np.all(np.diff(ys) >= 0) and ys == pytest.approx([5.0, 6.5, 9.0])


# -- probes of a real model on real audio -----------------------------------------------------------------
@pytest.mark.slow
def test_workbench_probes_each_unit_alone_and_leaves_the_baseline_alone(tiny_study_inputs: dict[str, Path],
                                                                        tmp_path: Path) -> None:
    from lsv_core.evaluate import evaluate
    from lsv_core.quant import quantize
    from lsv_core.workbench import DataPaths, Workbench, WorkbenchSpec
    from search.config import SpaceSection
    from search.space import SearchSpace

    spec = WorkbenchSpec(checkpoint=tiny_study_inputs["checkpoint"], data=DataPaths.corpus(tiny_study_inputs["corpus"]),
                         cache_dir=tmp_path / "cache", device="cpu")
    bench = Workbench.load(spec, progress=False)
    space = SearchSpace.build(bench.model, SpaceSection(granularity="stage", bits=[1, 2, 4, 8]))
    before = state_dict_digest(bench.model)
    result = bench.probe(space.unit_layers(), space.choices, max_frames=100)
    assert state_dict_digest(bench.model) == before
    assert result.context == "4" and set(result.damage) == set(space.units)
    assert all(set(d) == {"1a", "2"} for d in result.damage.values())
    assert result.wall_s > 0 and result.settings == {"max_frames": 100, "n_trials": len(bench.trials)}

    def eer(overrides: dict[str, str]) -> float:
        params = {f"b:{u}": overrides.get(u, "4") for u in space.units}
        model = quantize(copy.deepcopy(bench.model), space.recipe_from_params(params))
        return evaluate(model, bench.eval_store, bench.trials, n_boot=0, max_frames=100).eer

    # The reference is every unit at 4 bit; a damage is that unit alone at the probed width, the rest at 4.
    assert result.reference == pytest.approx(eer({}))
    unit = next(iter(space.units))
    assert result.damage[unit]["1a"] == pytest.approx(eer({unit: "1a"}) - result.reference)


# -- the sampler -------------------------------------------------------------------------------------------
def probes_of(model: torch.nn.Module, space, objective) -> ProbeResult:
    """Probes of the proxy objective: the same one-shot protocol, scored by the objective on the recipe."""
    return probe_units(model, space.unit_layers(), space.choices, lambda m: objective(recipe_of(m)))


def probe_study(tmp_path: Path, name: str, seed: int, objective, budget_mb: float):
    study, space, model, config = make_study(tmp_path, name, "probe", seed, traces=False, budget_mb=budget_mb)
    record = stored_record(study)
    save_record(study, None, record.with_probes(probes_of(model, space, objective).to_dict()))
    return study, space, model, config


def test_unit_table_takes_the_probes_damage() -> None:
    model = thin_model()
    from search.config import SpaceSection
    from search.space import SearchSpace

    space = SearchSpace.build(model, SpaceSection(granularity="block", bits=[1, 2, 3, 4, 8]))
    objective = proxy_objective(model, 0)
    probe = probes_of(model, space, objective)
    table = unit_table(model, space, None, probe=probe)
    layers = space.unit_layers()
    errors = quantization_errors(model, (2, 3, 4, 8))
    unit_errors = {u: {b: sum(errors[n][b] for n in ls) for b in (2, 3, 4, 8)} for u, ls in layers.items()}
    expected = estimated_damage(probe, unit_errors, space.choices)
    for u, unit in enumerate(space.units):
        assert table.omega[u] == pytest.approx([expected[unit][t] for t in space.choices])
        assert table.omega[u, space.choices.index("4")] == 0.0
    with pytest.raises(LsvError, match="do not cover units"):
        unit_table(model, space, None, probe=ProbeResult("4", 1.0, {}))


def test_probe_sampler_is_registered_fits_the_budget_and_is_reproducible(tmp_path: Path) -> None:
    assert isinstance(SAMPLERS["probe"](0), ProbePriorSampler)
    model = thin_model()
    budget_mb = packed_size_bytes(model, BitRecipe.uniform(model, 2)) / 1e6
    objective = proxy_objective(model, 0)
    runs = []
    for i, seed in enumerate((5, 5, 6)):
        study, space, model, config = probe_study(tmp_path, f"p{i}", seed, objective, budget_mb)
        trials = drive(study, space, model, config, 14, objective)
        assert all(t["size"] <= config.size_budget_bytes for t in trials)
        assert not any(t.user_attrs.get("repaired") for t in study.trials)
        digests = [t["recipe"].digest() for t in trials]
        assert len(set(digests)) == len(digests) == 14
        runs.append(digests)
    assert runs[0] == runs[1] and runs[0] != runs[2]


def test_a_probe_study_without_probes_is_refused_by_name(tmp_path: Path) -> None:
    model = thin_model()
    study, space, model, config = make_study(tmp_path, "np", "probe", 0, traces=False)
    with pytest.raises(LsvError, match="no unit probes"):
        drive(study, space, model, config, 1, proxy_objective(model, 0))


def test_probe_sampler_beats_random_and_the_hessian_prior_on_an_objective_omega_mispredicts(tmp_path: Path) -> None:
    """The proxy objective weighs every layer's Ω by a factor the Hessian prior does not know; the probes
    measure it. 16 trials, three objectives: the probe sampler's hypervolume is the best on average."""
    from tests.test_samplers import make_study as hessian_study

    model = thin_model()
    budget_mb = packed_size_bytes(model, BitRecipe.uniform(model, 4)) / 1e6
    fp32 = packed_size_bytes(model, BitRecipe({}))
    results: dict[str, list[float]] = {"probe": [], "hessian": [], "random": []}
    for seed in range(3):
        objective = proxy_objective(model, 20 + seed)
        for sampler in results:
            if sampler == "probe":
                study, space, model, config = probe_study(tmp_path, f"q{seed}", seed, objective, budget_mb)
            else:
                study, space, model, config = hessian_study(tmp_path, f"{sampler}{seed}", sampler, seed,
                                                            budget_mb=budget_mb)
            trials = drive(study, space, model, config, 16, objective)
            points = [(objective(t["recipe"]), t["size"]) for t in trials]
            results[sampler].append(hypervolume(points, (40.0, config.size_budget_bytes), size_scale=fp32))
    assert np.mean(results["probe"]) > np.mean(results["random"])
    assert np.mean(results["probe"]) > np.mean(results["hessian"])


def test_hypervolume_gain_equals_the_difference_of_hypervolumes() -> None:
    from search.samplers.prior import _hv_gain, _staircase

    rng = np.random.default_rng(0)
    ref = (20.0, 100.0)
    for _ in range(200):
        pts = [(float(e), float(s)) for e, s in zip(rng.uniform(2, 25, 12), rng.integers(10, 110, 12), strict=True)]
        new = (float(rng.uniform(2, 25)), float(rng.integers(10, 110)))
        expected = hypervolume(pts + [new], ref) - hypervolume(pts, ref)
        assert _hv_gain(_staircase(pts), new, ref) == pytest.approx(expected, abs=1e-9)


# -- a real study ------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("where", ["driver", "worker"])
def test_a_probe_study_measures_its_probes_once_before_the_first_trial(tiny_study_inputs: dict[str, Path],
                                                                      tmp_path: Path, where: str) -> None:
    import optuna

    from search.config import parse_study_config
    from search.space import SearchSpace
    from search.study.run import run_study
    from tests.conftest import study_raw_config

    raw = study_raw_config(tiny_study_inputs, tmp_path, name="pr", study={"sampler": "probe", "n_trials": 5},
                           resources={"hessian": where})
    config = parse_study_config(raw)
    run_study(config, progress=False)
    study = optuna.load_study(study_name="pr", storage=config.optuna_url)
    record = stored_record(study)
    assert record is not None and record.unit_probes is not None
    assert record.hessian_traces is None  # no allocator seed, no sensitivity order: no Hessian needed
    probes = ProbeResult.from_dict(record.unit_probes)
    from lsv_core.models import load_checkpoint

    space = SearchSpace.build(load_checkpoint(config.model.checkpoint)[0], config.space)
    assert set(probes.damage) == set(space.units) and probes.wall_s > 0
    assert len(study.trials) == 5 and all(t.state.is_finished() for t in study.trials)
    # More trials on the same study: the probes in the record are reused, not measured again.
    raw["study"]["n_trials"] = 7
    run_study(parse_study_config(raw), progress=False)
    again = stored_record(optuna.load_study(study_name="pr", storage=config.optuna_url))
    assert again.unit_probes == record.unit_probes
