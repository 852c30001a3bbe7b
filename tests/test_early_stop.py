"""Stage-aware early stopping compares like with like (same stage plan) and keeps its history across a resume
(rebuilt from what the study's real Optuna SQLite storage holds; the searcher driven as Ray Tune calls it)."""

from __future__ import annotations

from pathlib import Path

import optuna
from optuna.trial import TrialState

from lsv_core.models import build_model
from lsv_core.quant import BitRecipe, packed_size_bytes, quantizable_layers
from lsv_core.quant.msft import plan_stages
from search.config import SpaceSection
from search.results.tracking import TrialRecord
from search.space import SearchSpace
from search.study.scheduler import StageParetoStopper, stage_history, stage_plan_key
from search.study.searcher import AskTellSearcher

MODEL = build_model("ThinResNet", m_channels=4, first_stride=2, embed_dim=32)


class _T:
    def __init__(self, tid: str) -> None:
        self.trial_id = tid


def _stage(number: int, plan: str, stage: int, eer: float, size: int, n_stages: int = 3) -> dict:
    return {"stage": stage, "n_stages": n_stages, "eer": eer, "size_bytes": size, "stage_plan": plan,
            "optuna_trial": number, "final": False}


def _plan_of(recipe: BitRecipe, order: str = "bits") -> str:
    groups = plan_stages(MODEL, recipe, order, 4)
    return stage_plan_key(order, [[recipe[n].bits for n in g] for g in groups])


def test_stage_plans_of_real_recipes() -> None:
    layers = quantizable_layers(MODEL)
    mixed = BitRecipe.from_mapping({n: (2 if i % 3 == 0 else 4 if i % 3 == 1 else 8) for i, n in enumerate(layers)})
    two = BitRecipe.from_mapping({n: (4 if i % 2 else 8) for i, n in enumerate(layers)})
    assert _plan_of(mixed) == "bits:2-4-8"
    assert _plan_of(two) == "bits:4-8"
    assert _plan_of(BitRecipe.uniform(MODEL, 4)) == "bits:4"
    # Orders that split the layers by count: every full recipe has the same plan.
    assert _plan_of(mixed, "depth") == _plan_of(two, "depth") == "depth:4"


def test_stage_k_is_compared_only_within_the_same_stage_plan() -> None:
    stopper = StageParetoStopper(margin=1.0, min_peers=2)
    # Two 4/8-bit trials (2 stages: stage 0 = their 4-bit layers, half the fine-tuning) look very good at stage 0.
    for n, eer in ((0, 2.0), (1, 2.1)):
        assert stopper.on_trial_result(None, _T(f"r{n}"), _stage(n, "bits:4-8", 0, eer, 100, 2)) == "CONTINUE"
    # A 2/4/8-bit trial's stage 0 (only its 2-bit layers quantized, a third of the fine-tuning) is not theirs:
    # it is worse by far more than the margin, yet not stopped.
    assert stopper.on_trial_result(None, _T("r2"), _stage(2, "bits:2-4-8", 0, 9.0, 150)) == "CONTINUE"
    # A 4/8-bit trial, dominated by its two like peers, is.
    assert stopper.on_trial_result(None, _T("r3"), _stage(3, "bits:4-8", 0, 9.0, 150, 2)) == "STOP"
    # Within its own plan the 2/4/8-bit trial is judged as before.
    for n, eer in ((4, 3.0), (5, 3.5)):
        stopper.on_trial_result(None, _T(f"r{n}"), _stage(n, "bits:2-4-8", 0, eer, 120))
    assert stopper.on_trial_result(None, _T("r6"), _stage(6, "bits:2-4-8", 0, 9.0, 150)) == "STOP"


def _searcher(db: Path) -> tuple[optuna.Study, SearchSpace, AskTellSearcher]:
    study = optuna.create_study(study_name="s", storage=f"sqlite:///{db}", directions=["minimize", "minimize"],
                                sampler=optuna.samplers.RandomSampler(seed=0), load_if_exists=True)
    space = SearchSpace.build(MODEL, SpaceSection(granularity="stage", bits=[2, 4, 8]))
    records: list[TrialRecord] = []
    searcher = AskTellSearcher(study, space, size_of=lambda r: packed_size_bytes(MODEL, r), budget_bytes=None,
                               make_config=lambda r, n: {"recipe": r.to_dict(), "optuna_trial": n},
                               sink=records.append)
    return study, space, searcher


def test_history_survives_a_resume(tmp_path: Path) -> None:
    db = tmp_path / "o.db"
    study, space, searcher = _searcher(db)
    plan = "bits:2-4-8"
    # Run 1: two trials of the same plan, each reporting every stage as run_trial does; one is stopped early
    # after stage 1, one completes.
    for tid, n_eer in (("a", (2.0, 2.5)), ("b", (2.2, 2.4))):
        cfg = searcher.suggest(tid)
        number = cfg["optuna_trial"]
        for stage, eer in enumerate(n_eer):
            searcher.on_trial_result(tid, _stage(number, plan, stage, eer, 100))
        if tid == "a":
            searcher.on_trial_complete(tid, _stage(number, plan, 1, n_eer[1], 100))
        else:
            searcher.on_trial_result(tid, _stage(number, plan, 2, 2.3, 100))
            searcher.on_trial_complete(tid, {"final": True, "eer": 2.3, "size_bytes": 100, "stage_plan": plan,
                                             "stage_eers": [*n_eer, 2.3], "eer_ci_low": 2.0, "eer_ci_high": 2.6,
                                             "min_dcf_001": 0.1, "compression_ratio": 9.0, "avg_bits": 4.0})
    assert [t.state for t in study.trials] == [TrialState.PRUNED, TrialState.COMPLETE]
    pruned = study.trials[0].user_attrs
    assert pruned["stage_eers"] == [2.0, 2.5] and pruned["stage_plan"] == plan and pruned["size_bytes"] == 100

    # Run 2 (the driver restarted): only the storage is left.
    resumed = optuna.load_study(study_name="s", storage=f"sqlite:///{db}")
    history = stage_history(resumed)
    assert history[(plan, 0)] == {"optuna-0": (2.0, 100.0), "optuna-1": (2.2, 100.0)}
    assert history[(plan, 1)] == {"optuna-0": (2.5, 100.0), "optuna-1": (2.4, 100.0)}
    bad = _stage(7, plan, 0, 9.0, 150)
    assert StageParetoStopper(1.0, 2, history=history).on_trial_result(None, _T("c"), bad) == "STOP"
    assert StageParetoStopper(1.0, 2).on_trial_result(None, _T("c"), bad) == "CONTINUE"  # what was lost before
    # Another plan's history does not count, and a memoized copy adds no peer of its own.
    other = _stage(8, "bits:4-8", 0, 9.0, 150, 2)
    assert StageParetoStopper(1.0, 2, history=history).on_trial_result(None, _T("d"), other) == "CONTINUE"
    study.enqueue_trial(dict(study.trials[1].params))
    _, _, searcher2 = _searcher(db)
    searcher2.suggest("e")  # the memoized repeat of trial 1, then a fresh proposal
    memo = [t for t in resumed.get_trials(deepcopy=False) if "memoized_from" in t.user_attrs]
    assert len(memo) == 1 and memo[0].user_attrs["stage_eers"] == [2.2, 2.4, 2.3]
    assert set(stage_history(resumed)[(plan, 0)]) == {"optuna-0", "optuna-1"}
