"""Study config validation, search space, early-stopping rule and the ask/tell searcher (real Optuna
SQLite storage, no Ray: the searcher's methods are driven directly as Ray Tune would call them)."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from lsv_core.errors import ConfigError
from lsv_core.models import build_model
from lsv_core.quant import BitRecipe, packed_size_bytes, quantizable_layers
from lsv_core.quant.msft import MsftSchedule
from search.cli import main
from search.config import SpaceSection, load_study_config, parse_study_config
from search.results.tracking import TrialRecord
from search.space import SearchSpace
from search.study.scheduler import StageParetoStopper, dominated_by_margin
from search.study.searcher import AskTellSearcher

MODEL = build_model("ThinResNet", m_channels=4, first_stride=2, embed_dim=32)


# -- config -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("section", "value", "expected"),
    [
        ({"study": {"name": "x", "sampler": "cmaes"}}, "cmaes", r"study\.sampler \(got 'cmaes'\): allowed samplers are \['gp', 'hessian', 'nsga2', 'probe', 'random', 'tpe'\]"),
        ({"study": {"name": "x"}, "space": {"bits": [1, 5]}}, "5", r"space\.bits \(got \[1, 5\]\): allowed bit widths are \[1, 2, 3, 4, 8\]"),
        ({"study": {"name": "bad name!"}}, "name", r"study\.name \(got 'bad name!'\)"),
        ({"study": {"name": "x", "n_trials": 0}}, "0", r"study\.n_trials \(got 0\): Input should be greater than or equal to 1"),
        ({"study": {"name": "x"}, "storage": {"optuna": "redis://h"}}, "redis", r"storage\.optuna \(got 'redis://h'\): an RDB URL"),
        ({"study": {"name": "x"}, "msft": {"orderr": "bits"}}, "orderr", r"msft\.orderr .*unknown field"),
        ({"study": {"name": "x"}, "data": {"train": "a"}}, "train", r"data: give all of train, eval and trials"),
        ({"study": {"name": "x"}, "msft": {"order": "random"}}, "random",
         r"msft\.order \(got 'random'\): Input should be 'bits', 'sensitivity', 'depth' or 'one_shot'"),
        ({"study": {"name": "x"}, "msft": {"stage_eval_frames": 5}}, "5", r"msft\.stage_eval_frames \(got 5\)"),
    ],
)
def test_invalid_fields_are_named(section: dict, value: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        parse_study_config(section, source="s.toml")


def test_cli_rejects_bad_config_with_exit_2_and_starts_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text(f'[study]\nname = "bad"\nout_dir = "{tmp_path / "runs"}"\nsampler = "anneal"\n')
    assert main(["run", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "study.sampler" in err and "anneal" in err and "'tpe'" in err
    assert not (tmp_path / "runs").exists()
    assert main(["status", str(cfg)]) == 2


def test_shipped_study_configs_are_valid() -> None:
    root = Path(__file__).resolve().parents[1] / "studies"
    configs = sorted(root.glob("*.toml"))
    assert {p.name for p in configs} >= {"quickstart.toml", "quickstart_ecapa.toml", "voxceleb_resnet34.toml",
                                        "voxceleb_ecapa_tdnn.toml",
                                        "voxceleb_campplus.toml"}
    for path in configs:
        cfg = load_study_config(path)
        assert cfg.study.name == path.stem
    quick = load_study_config(root / "quickstart.toml")
    assert quick.study.n_trials is not None and quick.study.n_trials >= 16
    assert quick.optuna_url.startswith("sqlite:///") and quick.mlflow_uri.startswith("sqlite:///")


def test_digest_ignores_run_length_but_not_the_space() -> None:
    base = {"study": {"name": "x"}}
    a = parse_study_config(base)
    assert a.digest() == parse_study_config(base, n_trials=99).digest()
    assert a.digest() != parse_study_config({**base, "space": {"bits": [2, 4]}}).digest()


def test_msft_final_lr_reaches_the_schedule_and_keeps_old_digests() -> None:
    """``[msft] final_lr`` was added after studies were made: left at the library's default it does not
    enter the digest (those studies still resume); set, it changes the digest and the trials' schedule."""
    base = {"study": {"name": "x"}, "msft": {"lr": 0.004}}
    plain = parse_study_config(base)
    assert plain.msft_schedule().final_lr == MsftSchedule().final_lr
    # The digest this config had before the field existed (computed at commit 2d971ee).
    assert plain.digest() == "6ef3c77d6c9a526c"
    assert plain.digest() == parse_study_config({**base, "msft": {"lr": 0.004,
                                                                  "final_lr": MsftSchedule().final_lr}}).digest()
    set_ = parse_study_config({**base, "msft": {"lr": 0.004, "final_lr": 0.0002}})
    assert set_.msft_schedule().final_lr == 0.0002 and set_.msft_schedule().lr == 0.004
    assert set_.digest() != plain.digest()
    with pytest.raises(ConfigError, match="final_lr"):
        parse_study_config({**base, "msft": {"final_lr": 0}})


# -- space --------------------------------------------------------------------------------------------------
def test_space_units_by_granularity_and_ties() -> None:
    layers = quantizable_layers(MODEL)
    per_layer = SearchSpace.build(MODEL, SpaceSection(granularity="layer", tie_shortcuts=True))
    assert all(".shortcut." not in u for u in per_layer.units)
    assert set(per_layer.tied) == {n for n in layers if ".shortcut." in n}
    stage = SearchSpace.build(MODEL, SpaceSection(granularity="stage"))
    assert set(stage.units) == {"conv1", "layer1", "layer2", "layer3", "layer4", "seg_1"}
    fixed = SearchSpace.build(MODEL, SpaceSection(granularity="block", fixed={"conv1": 8, "seg_1": None}))
    assert "conv1" not in fixed.units and "seg_1" not in fixed.units
    recipe = fixed.uniform("2")
    assert recipe["conv1"].bits == 8 and "seg_1" not in recipe
    assert per_layer.choices == ("1a", "2", "3", "4", "8")
    with pytest.raises(ConfigError, match="unknown layer"):
        SearchSpace.build(MODEL, SpaceSection(fixed={"nope": 4}))


def test_params_round_trip_and_tied_shortcut_follows_block() -> None:
    space = SearchSpace.build(MODEL, SpaceSection(granularity="layer", binary_modes=["static", "adaptive"]))
    assert space.choices[:2] == ("1s", "1a")
    params = {k: space.choices[i % len(space.choices)] for i, k in enumerate(space.distributions())}
    recipe = space.recipe_from_params(params)
    assert space.params_from_recipe(recipe) == params
    for short, owner in space.tied.items():
        assert recipe[short] == recipe[owner]


def test_repair_meets_budget_greedily_and_deterministically() -> None:
    space = SearchSpace.build(MODEL, SpaceSection(granularity="layer"))
    size_of = lambda r: packed_size_bytes(MODEL, r)  # noqa: E731
    params = space.params_from_recipe(space.uniform("8"))
    budget = size_of(space.uniform("4"))
    fixed = space.repair(params, budget, size_of)
    assert fixed is not None and size_of(space.recipe_from_params(fixed)) <= budget
    assert fixed == space.repair(params, budget, size_of)
    # Already within budget: unchanged. Impossible budget: None.
    assert space.repair(fixed, budget, size_of) == fixed
    assert space.repair(params, size_of(space.uniform("1a")) - 1, size_of) is None


# -- early stopping ---------------------------------------------------------------------------------------
def test_dominated_by_margin() -> None:
    peers = [(2.0, 100.0), (2.5, 90.0), (1.0, 200.0)]
    assert dominated_by_margin((4.0, 100.0), peers, 1.0) == 2
    assert dominated_by_margin((2.9, 100.0), peers, 1.0) == 0  # within the margin
    assert dominated_by_margin((9.0, 50.0), peers, 1.0) == 0  # smaller than all peers


def test_stopper_stops_only_dominated_non_final_stages() -> None:
    stopper = StageParetoStopper(margin=1.0, min_peers=2)

    class T:
        def __init__(self, tid: str) -> None:
            self.trial_id = tid

    for i, (eer, size) in enumerate([(2.0, 100), (2.2, 100)]):
        assert stopper.on_trial_result(None, T(f"p{i}"), {"stage": 0, "n_stages": 3, "eer": eer, "size_bytes": size}) == "CONTINUE"
    assert stopper.on_trial_result(None, T("bad"), {"stage": 0, "n_stages": 3, "eer": 9.0, "size_bytes": 150}) == "STOP"
    assert stopper.on_trial_result(None, T("ok"), {"stage": 0, "n_stages": 3, "eer": 9.0, "size_bytes": 50}) == "CONTINUE"
    # The last stage is never cut, and final results are never judged.
    assert stopper.on_trial_result(None, T("last"), {"stage": 2, "n_stages": 3, "eer": 99.0, "size_bytes": 999}) == "CONTINUE"
    assert stopper.on_trial_result(None, T("f"), {"final": True, "eer": 99.0, "size_bytes": 999}) == "CONTINUE"


# -- searcher ------------------------------------------------------------------------------------------------
def make_searcher(tmp_path: Path, budget: int | None = None, max_trials: int | None = None):
    study = optuna.create_study(study_name="s", storage=f"sqlite:///{tmp_path / 'o.db'}",
                                directions=["minimize", "minimize"], sampler=optuna.samplers.RandomSampler(seed=0))
    space = SearchSpace.build(MODEL, SpaceSection(granularity="stage", bits=[2, 4]))
    records: list[TrialRecord] = []
    searcher = AskTellSearcher(study, space, size_of=lambda r: packed_size_bytes(MODEL, r), budget_bytes=budget,
                               make_config=lambda r, n: {"recipe": r.to_dict(), "optuna_trial": n},
                               sink=records.append, max_trials=max_trials)
    return study, space, searcher, records


def final(eer: float, size: int) -> dict:
    return {"final": True, "eer": eer, "size_bytes": size, "eer_ci_low": eer - 0.1, "eer_ci_high": eer + 0.1,
            "min_dcf_001": 0.1, "compression_ratio": 5.0, "avg_bits": 3.0, "stage_eers": [eer + 1, eer]}


def test_searcher_tells_only_final_values_and_memoizes(tmp_path: Path) -> None:
    study, space, searcher, records = make_searcher(tmp_path)
    uniform4 = space.params_from_recipe(space.uniform("4"))
    study.enqueue_trial(uniform4)
    study.enqueue_trial(uniform4)  # a duplicate suggestion
    cfg = searcher.suggest("a")
    assert BitRecipe.from_mapping(cfg["recipe"]) == space.uniform("4")
    searcher.on_trial_result("a", {"stage": 0, "eer": 50.0, "size_bytes": 10})  # intermediate: not told
    assert study.trials[0].state == TrialState.RUNNING
    searcher.on_trial_complete("a", final(3.0, 1234))
    assert study.trials[0].values == [3.0, 1234.0]
    # The duplicate is answered from the memo without training, then a new recipe is proposed.
    cfg2 = searcher.suggest("b")
    dup = study.trials[1]
    assert dup.state == TrialState.COMPLETE and dup.values == [3.0, 1234.0]
    assert dup.user_attrs["memoized_from"] == 0
    assert BitRecipe.from_mapping(cfg2["recipe"]).digest() != space.uniform("4").digest()
    assert [r.state for r in records] == ["complete", "complete"] and records[1].memoized_from == 0
    # Pruned (stopped early) and failed trials are told as such, never with values.
    searcher.on_trial_complete("b", {"final": False, "stage": 0, "eer": 40.0})
    cfg3 = searcher.suggest("c")
    assert cfg3 is not None
    searcher.on_trial_complete("c", {"final": True, "error": "FloatingPointError: loss is nan"})
    states = [t.state for t in study.trials]
    assert states[2] == TrialState.PRUNED and states[3] == TrialState.FAIL
    assert study.trials[3].user_attrs["reason"].startswith("FloatingPointError")
    assert records[-1].state == "failed" and "nan" in records[-1].reason


def test_searcher_repairs_over_budget_and_respects_trial_limit(tmp_path: Path) -> None:
    budget = packed_size_bytes(MODEL, BitRecipe.uniform(MODEL, 4)) - 100
    study, space, searcher, records = make_searcher(tmp_path, budget=budget, max_trials=3)
    study.enqueue_trial(space.params_from_recipe(space.uniform("4")))
    cfg = searcher.suggest("a")
    recipe = BitRecipe.from_mapping(cfg["recipe"])
    assert packed_size_bytes(MODEL, recipe) <= budget
    assert study.trials[0].user_attrs["repaired"] is True
    assert searcher.suggest("b") is not None and searcher.suggest("c") is not None
    assert searcher.suggest("d") == AskTellSearcher.FINISHED


def test_layer_sensitivity_picks_each_layers_omega_at_its_bits() -> None:
    from search.study.trial import layer_sensitivity

    layers = quantizable_layers(MODEL)[:3]
    omega = {name: {1: 100.0 + i, 2: 10.0 + i, 4: 1.0 + i} for i, name in enumerate(layers)}
    omega_json = {name: {str(b): v for b, v in table.items()} for name, table in omega.items()}  # as JSON gives it
    recipe = BitRecipe({layers[0]: 4, layers[1]: (1, "adaptive"), layers[2]: 2})
    want = {layers[0]: 1.0, layers[1]: 101.0, layers[2]: 12.0}
    assert layer_sensitivity(omega, recipe) == want
    assert layer_sensitivity(omega_json, recipe) == want
    assert layer_sensitivity(None, recipe) is None


def test_evaluation_subset_does_not_follow_the_study_seed() -> None:
    base = {"study": {"name": "x"}, "data": {"max_trials": 100}}
    specs = [parse_study_config({**base, "study": {"name": "x", "seed": s}}).workbench_spec() for s in (0, 7)]
    assert specs[0].subset_seed == specs[1].subset_seed == 0  # same trials whatever the search seed
    moved = parse_study_config({**base, "data": {"max_trials": 100, "subset_seed": 3}})
    assert moved.workbench_spec().subset_seed == 3


def test_a_trial_uses_exactly_the_gpus_ray_assigned_it() -> None:
    from search.study.trial import trial_device

    assert trial_device("auto", []) == "cpu"  # gpu = 0: the CPU, even on a GPU node
    assert trial_device("auto", ["3"], "3") == "cuda:0"  # Ray's CUDA_VISIBLE_DEVICES makes its GPU the first
    assert trial_device("cpu", ["0"]) == "cpu"
    assert trial_device("cuda", ["1"], "1") == "cuda:0"
    with pytest.raises(RuntimeError, match="assigned this trial no GPU"):
        trial_device("cuda", [])
    cfg = parse_study_config({"study": {"name": "g"}, "resources": {"gpu": 0.5}})  # two trials share one GPU
    assert cfg.resources.gpu == 0.5
    for bad, match in (({"device": "cuda"}, "needs gpu > 0"), ({"device": "tpu"}, "allowed: 'auto'"),
                       ({"gpu": 1.5}, "fraction of one GPU")):
        with pytest.raises(ConfigError, match=match):
            parse_study_config({"study": {"name": "g"}, "resources": bad})
