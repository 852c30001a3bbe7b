"""``lsv status``: progress and Pareto front of a study, without running anything."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from search.flags import Bounded


def _status(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from search.cluster.storage import read_record
    from search.config import load_study_config
    from search.results.reading import study_status

    config = load_study_config(args.study)
    rule = _status_rule(args)  # a bad --max-eer / --max-size-mb is refused before the storage is opened
    _, study = read_record(config)
    if rule is not None:
        return _status_selected(study, rule, args.json)
    st = study_status(study, config.size_budget_bytes)
    choices = _choices(study, args.within_pp)
    if args.json:
        print(json.dumps({**asdict(st), "choices": choices}, indent=2))
    else:
        print(st.line())
        print(st.cost.line())
        for p in st.pareto:
            eer = "-" if p["eer"] is None else f"{p['eer']:.2f} %"
            dcf = f"  minDCF {p['min_dcf']:.4f}" if "min_dcf" in p else ""
            print(f"  trial {p['number']:4d}: EER {eer}{dcf}  {p['size_bytes']} bytes")
        for what, c in choices.items():
            print(f"{what}: " + ("-" if c is None else c["text"]))
    return 0


def _status_rule(args: argparse.Namespace) -> Any:
    """The selection `lsv status` was asked for (the rules `lsv export` uses), or None for the overview."""
    from search.results.selection import SelectionRule

    if args.max_eer is None and args.max_size_mb is None and not args.knee:
        return None
    return SelectionRule(max_eer=args.max_eer, max_size_mb=args.max_size_mb, knee=args.knee)


def _status_selected(study: Any, rule: Any, as_json: bool) -> int:
    """Answer one anytime question from the study's record (no re-evaluation): the trial ``rule`` picks, as
    ``lsv export`` would pick it."""
    from search.results.describe import recipe_in_words
    from search.results.reading import load_control, load_points
    from search.results.selection import select_trial

    points = load_points(study)
    p = select_trial(points, rule, load_control(study))
    words = recipe_in_words(p.recipe) if p.recipe else "no recipe"
    selected = {"number": p.number, "eer": p.eer, "eer_ci_low": p.eer_ci_low, "eer_ci_high": p.eer_ci_high,
                "min_dcf": p.min_dcf, "size_bytes": p.size_bytes, "compression_ratio": p.compression_ratio,
                "recipe": words, "recipe_layers": dict(p.recipe), "memoized_from": p.memoized_from}
    if as_json:
        print(json.dumps({"study": study.study_name, "rule": rule.describe(), "selected": selected}, indent=2))
        return 0
    ci = "" if p.eer_ci_low is None or p.eer_ci_high is None else f" [{p.eer_ci_low:.2f}, {p.eer_ci_high:.2f}]"
    print(f"{rule.describe()}: trial {p.number}: EER {p.eer:.2f} %{ci}, {p.size_bytes:,} bytes — {words}")
    return 0


def _choices(study: object, within_pp: float) -> dict[str, dict | None]:
    """What `lsv status` answers: the control, the knee (plain and CI-aware) and the smallest models not
    significantly worse than the control / within ``within_pp`` points of it."""
    from search.results.pareto import ci_knee_point, knee_point, smallest_not_worse_than, smallest_within_of
    from search.results.reading import control_delta, load_control, load_points

    points = [p for p in load_points(study) if p.memoized_from is None]
    control = load_control(study)

    def about(i: int | None) -> dict | None:
        if i is None:
            return None
        p = points[i]
        d = control_delta(p, control)
        vs = "" if d is None else f", vs control {d[0]:+.2f} [{d[1]:+.2f}, {d[2]:+.2f}] points"
        return {"trial": p.number, "eer": p.eer, "size_bytes": p.size_bytes,
                "text": f"trial {p.number}: EER {p.eer:.2f} %, {p.size_bytes:,} bytes{vs}"}

    out: dict[str, dict | None] = {
        "fp32 control": None if control is None else {
            "eer": control.eer, "text": f"EER {control.eer:.2f} % [{control.eer_ci_low:.2f}, {control.eer_ci_high:.2f}]"
                                        " (same fine-tuning, nothing quantized)"},
        "knee": about(knee_point(points)),
        "knee, CI-aware (smallest not significantly worse than the knee)": about(ci_knee_point(points)),
    }
    if control is not None:
        out["smallest not significantly worse than the control"] = about(smallest_not_worse_than(points, control))
        out[f"smallest within {within_pp:g} points of the control"] = about(
            smallest_within_of(points, control, within_pp))
    return out


def add_status_parser(sub: argparse._SubParsersAction) -> None:
    """`lsv status`."""
    st = sub.add_parser("status", help="progress and Pareto front of a study, without running anything")
    st.add_argument("study", type=Path, help="study config (.toml)")
    st.add_argument("--json", action="store_true")
    st.add_argument("--within-pp", type=Bounded(float, ge=0), default=0.5,
                    help="also show the smallest model within X EER points of the fp32 control (default 0.5)")
    ask = st.add_mutually_exclusive_group()  # answered from the record, as `lsv export` would choose
    ask.add_argument("--max-eer", type=Bounded(float, ge=0, le=100), help="only the smallest model with EER <= Y percent")
    ask.add_argument("--max-size-mb", type=Bounded(float, gt=0), help="only the lowest-EER model of at most X MB (1e6 bytes)")
    ask.add_argument("--knee", action="store_true", help="only the knee of the Pareto front")
    st.set_defaults(func=_status)
