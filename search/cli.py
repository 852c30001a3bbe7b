"""``lsv``: the command line, a thin shell over the Python API.

Every subcommand maps onto one library call; errors caused by input (configs, data, existing outputs)
print one clear line and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from collections.abc import Callable, Sequence
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from rich.console import Console

from lsv_core.atomic import write_text_atomic
from lsv_core.errors import LsvError
from search.flags import SEED, TRIAL_NUMBER, WORKERS, Bounded, setting_flag

__all__ = ["COMMAND_GROUP", "EXIT_BAD_INPUT", "EXIT_FAILED_TRIALS", "EXIT_INTERRUPTED", "EXIT_OK", "build_parser", "main"]

console = Console(stderr=True, soft_wrap=True)
# Exit statuses of every command (README, "Exit codes").
EXIT_OK = 0
EXIT_BAD_INPUT = 2
EXIT_FAILED_TRIALS = 3  # `lsv run`: the study ended, but some trials failed (their reasons are printed)
EXIT_INTERRUPTED = 130  # Ctrl-C (SIGINT) after a clean stop: running trials re-queued, nothing lost
EXIT_SIGTERM = 143
EXIT_LEASE_LOST = 4  # `lsv run`: another driver took the study over while this one was stalled
# Other packages add subcommands through this entry-point group: ``f(subparsers)`` adds a parser whose
# ``func(args) -> int`` runs it. The dashboards package adds ``report`` so that search never imports it.
COMMAND_GROUP = "lsv.commands"


def _refuse_bad_folders(folders: dict[str, Path | None], what: str) -> None:
    """Folders a command creates or writes (``--out DIR``, ``--cache``) that cannot be: refused, naming the flag,
    before anything is written (e.g. one under a regular file)."""
    from search.preflight import PreflightFailed, Problem, check_folders

    problems: list[Problem] = []
    check_folders(folders, problems)
    if problems:
        raise PreflightFailed(problems, what=what)


def _corpus_synth(args: argparse.Namespace) -> int:
    from lsv_core.data.synth import SynthConfig, synthesize_corpus

    _refuse_bad_folders({"--out": args.out}, "the synthesis")
    cfg = SynthConfig(speakers=args.speakers, utts=args.utts, seed=args.seed, eval_speakers=args.eval_speakers)
    summary = synthesize_corpus(args.out, cfg, workers=args.workers, overwrite=args.force)
    console.print(f"[green]corpus written[/] to {args.out}: {summary}")
    return 0


def _data_cache(args: argparse.Namespace) -> int:
    from lsv_core.data.features import FbankConfig
    from lsv_core.data.fingerprint import manifest_of
    from lsv_core.data.manifest import read_data
    from lsv_core.data.store import StoreConfig, build_store, store_folder

    _refuse_bad_folders({"--cache": args.cache}, "the feature store")
    data = read_data(args.data)
    manifest = manifest_of(data, cache_dir=args.cache, workers=args.workers)
    store = StoreConfig(dtype=args.dtype, shard_utts=args.shard_utts)
    n = build_store(data, manifest, args.cache, store=store, workers=args.workers)
    console.print(f"[green]feature store[/] {store_folder(args.cache, FbankConfig(), store)}: {len(data)} utterances "
                  f"of {args.data} ({n} computed now, {len(data) - n} already stored)")
    return 0


def _data_audit(args: argparse.Namespace) -> int:
    from lsv_core.data.audit import audit_audio, raise_for_problems
    from lsv_core.data.manifest import read_data

    _refuse_bad_folders({"--cache": args.cache}, "the audit")
    data = read_data(args.data)
    problems = audit_audio(data, cache_dir=args.cache, workers=args.workers)
    raise_for_problems(problems, source=str(args.data))
    console.print(f"[green]audio ok[/]: {len(data)} files of {args.data}")
    return 0


def _data_prepare_voxceleb(args: argparse.Namespace) -> int:
    from lsv_core.data.voxceleb import prepare_voxceleb

    _refuse_bad_folders({"--out": args.out}, "the preparation")
    summary = prepare_voxceleb(args.root, args.out, convert_m4a=args.convert_m4a, workers=args.workers,
                               overwrite=args.force)
    for name, counts in summary.sets.items():
        console.print(f"[green]{name}[/]: {counts['utterances']} utterances, {counts['speakers']} speakers -> "
                      f"{summary.out / name}")
    for name, n in summary.trials.items():
        console.print(f"[green]{name}[/]: {n} trials -> {summary.out / 'vox1' / name}")
    return 0


def _arch_kwargs(text: str | None) -> dict[str, Any]:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise LsvError(f"--arch-kwargs={text!r} is not JSON: {err}") from None
    if not isinstance(value, dict):
        raise LsvError(f"--arch-kwargs={text!r} should be a JSON object, e.g. '{{\"embed_dim\": 256}}'")
    return value


def _loading(args: argparse.Namespace) -> Any:
    from lsv_core.data.loader import DataLoading

    return DataLoading(features=args.features, loader_workers=args.loader_workers)


def _corpus_paths(args: argparse.Namespace) -> tuple[Path, Path | None, Path | None]:
    from lsv_core.workbench import DataPaths

    if args.corpus is not None:
        paths = DataPaths.corpus(args.corpus)
        return paths.train, paths.eval, paths.trials
    if args.train is None:
        raise LsvError("give --corpus DIR (with train/ and eval/) or --train DIR [--eval DIR --trials FILE]")
    return Path(args.train), (Path(args.eval) if args.eval else None), (Path(args.trials) if args.trials else None)


def _train(args: argparse.Namespace) -> int:
    import dataclasses

    from lsv_core.train import TrainConfig, train_baseline
    from lsv_core.workbench import DataPaths
    from search.preflight import (
        PreflightFailed,
        Problem,
        check_architecture,
        check_data,
        check_device,
        check_folders,
        check_outputs,
    )

    values: dict[str, Any] = {}
    if args.config:
        try:
            values = json.loads(Path(args.config).read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise LsvError(f"--config {args.config}: cannot read it as JSON ({err})") from None
        allowed = {f.name for f in dataclasses.fields(TrainConfig)}
        unknown = sorted(set(values) - allowed) if isinstance(values, dict) else ["(not an object)"]
        if unknown:
            raise LsvError(f"--config {args.config}: unknown field(s) {unknown}; allowed: {sorted(allowed)}")
    for name in ("steps", "seed", "device", "optimizer", "lr", "batch_size", "model", "time_budget_s"):
        if getattr(args, name) is not None:
            values[name] = getattr(args, name)
    cfg = TrainConfig(**values)  # built once, with --model, so model_kwargs defaults follow the model
    if args.m_channels is not None:
        cfg.model_kwargs = {**(cfg.model_kwargs or {}), "m_channels": args.m_channels}
    train_dir, eval_dir, trials = _corpus_paths(args)
    problems: list[Problem] = []
    check_outputs({"--out": args.out, "--out (summary)": args.out.with_suffix(".json")}, args.force, problems)
    cache = check_folders({"--cache": args.cache}, problems)["--cache"]
    check_device(cfg.device, problems)
    check_architecture(cfg.model, cfg.model_kwargs or {}, problems)
    if cfg.steps < 1:
        problems.append(Problem("--steps", f"{cfg.steps} should be >= 1"))
    fields = ("--corpus",) * 3 if args.corpus is not None else ("--train", "--eval", "--trials")
    if eval_dir is not None and trials is not None:
        check_data(DataPaths(train_dir, eval_dir, trials), problems, fields=fields, cache_dir=cache)
    elif not train_dir.exists():
        problems.append(Problem(fields[0], f"data dir {train_dir} does not exist"))
    if problems:
        raise PreflightFailed(problems, what="the training")
    summary = train_baseline(cfg, train_dir, out=args.out, eval_dir=eval_dir, trials=trials,
                             cache_dir=args.cache, overwrite=args.force)
    ev = summary.eval
    msg = f"[green]baseline[/] {summary.checkpoint}: {summary.params} params, {summary.train_wall_s:.0f} s training"
    if ev:
        msg += (f"; EER {ev['eer']:.2f} % [{ev['eer_ci_low']:.2f}, {ev['eer_ci_high']:.2f}], "
                f"minDCF(0.01) {ev['min_dcf_001']:.3f} on {ev['n_trials']} trials")
    console.print(msg)
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from lsv_core.evaluate import evaluate_dir
    from lsv_core.model_files import load_model_file
    from lsv_core.workbench import DataPaths
    from search.preflight import PreflightFailed, Problem, check_data, check_folders, check_outputs

    problems: list[Problem] = []
    check_outputs({"--json": args.json}, args.force, problems)
    cache = check_folders({"--cache": args.cache}, problems)["--cache"]
    if args.n_boot < 1:
        problems.append(Problem("--n-boot", f"{args.n_boot} should be >= 1 (bootstrap replicates of the EER interval)"))
    model = None
    try:
        model = load_model_file(args.model, name=args.arch)
    except LsvError as err:
        problems.append(Problem("--model", str(err)))
    check_data(DataPaths(args.data, args.data, args.trials), problems, fields=("--data", "--data", "--trials"),
               cache_dir=cache, need_train=False)
    if args.cohort is not None and not args.cohort.is_dir():
        problems.append(Problem("--cohort", f"{args.cohort} does not exist"))
    if problems:
        raise PreflightFailed(problems, what="the evaluation")
    result = evaluate_dir(model, args.data, args.trials, cache_dir=args.cache, cohort_dir=args.cohort,
                          n_boot=args.n_boot, loading=_loading(args))
    payload = {"model": str(args.model), "data": str(args.data), "trials": str(args.trials), **result.to_dict()}
    print(json.dumps(payload, indent=2))
    if args.json:
        write_text_atomic(args.json, json.dumps(payload, indent=2), overwrite=args.force)
    return 0


def _quantize(args: argparse.Namespace) -> int:
    from lsv_core.data.subset import TrainingSubset
    from lsv_core.export.packed import save_packed
    from lsv_core.quant import BitRecipe
    from lsv_core.quant.codebook import KMQATConfig
    from lsv_core.quant.msft import MsftSchedule
    from lsv_core.quant.sensitivity import allocate_bits
    from lsv_core.workbench import DataPaths, Workbench, WorkbenchSpec

    train_dir, eval_dir, trials = _corpus_paths(args)
    if eval_dir is None or trials is None:
        raise LsvError("quantize needs evaluation data: --corpus DIR, or --eval DIR and --trials FILE")
    schedule = MsftSchedule(order=args.msft, total_steps=args.steps, lr=args.lr, seed=args.seed,
                            batch_size=args.batch_size, kmqat=KMQATConfig(centroid_update=args.centroids))
    spec = WorkbenchSpec(checkpoint=args.model, data=DataPaths(train_dir, eval_dir, trials), cache_dir=args.cache,
                         max_trials=args.max_trials, subset_seed=args.seed, device=args.device,
                         arch=args.factory or args.arch,
                         arch_kwargs=_arch_kwargs(args.arch_kwargs),
                         loading=_loading(args),
                         train_subset=TrainingSubset(args.train_speakers, args.train_utts_per_speaker, args.seed))
    baseline, given = _check_quantize(args, spec)
    bench = Workbench.load(spec, baseline=baseline)
    omega = None
    if given is not None:
        recipe = given
    elif args.bits is not None:
        recipe = BitRecipe.uniform(bench.model, args.bits, mode=args.binary_mode if args.bits == 1 else None)
    else:
        omega = bench.sensitivities(cache_path=args.cache / "hessian_traces.json" if args.cache else None)
        recipe = allocate_bits(bench.model, omega, int(args.budget_mb * 1e6), binary_mode=args.binary_mode)
    sens = {n: max(v.values()) for n, v in omega.items()} if omega else None
    if args.msft == "sensitivity" and sens is None:
        sens = {n: max(v.values()) for n, v in bench.sensitivities().items()}
    outcome = bench.run(recipe, schedule, sensitivity=sens, progress=True)
    payload = {"model": str(args.model), **outcome.summary()}
    console.print(
        f"[green]quantized[/] avg {outcome.avg_bits:.2f} bits: EER {outcome.eer:.2f} % "
        f"[{outcome.eer_ci_low:.2f}, {outcome.eer_ci_high:.2f}], minDCF(0.01) {outcome.min_dcf_001:.3f}, "
        f"{outcome.size_bytes} bytes ({outcome.compression_ratio:.2f}x smaller than fp32 {outcome.fp32_bytes})"
    )
    if args.out is not None:
        save_packed(outcome.model, args.out, overwrite=args.force, metadata={"eer": outcome.eer})
        payload["packed"] = str(args.out)
    print(json.dumps({k: v for k, v in payload.items() if k != "stages"}, indent=2))
    if args.json:
        write_text_atomic(args.json, json.dumps(payload, indent=2), overwrite=args.force)
    return 0


def _check_quantize(args: argparse.Namespace, spec: Any) -> tuple[Any, Any]:
    """Everything `lsv quantize` can check before quantizing (outputs, budget, device, model, recipe, data,
    budget feasibility), all problems at once; returns the baseline and the ``--recipe`` (if given)."""
    from lsv_core.errors import ConfigError
    from lsv_core.models import build_model
    from lsv_core.models.plugin import resolve_factory
    from lsv_core.quant import BitRecipe, LayerSpec, packed_size_bytes
    from search.preflight import (
        PreflightFailed,
        Problem,
        check_data,
        check_device,
        check_folders,
        check_model,
        check_outputs,
    )

    problems: list[Problem] = []
    check_outputs({"--out": args.out, "--json": args.json}, args.force, problems)
    cache = check_folders({"--cache": args.cache}, problems)["--cache"]
    if args.budget_mb is not None and not args.budget_mb > 0:
        problems.append(Problem("--budget-mb", f"{args.budget_mb:g} should be > 0 (MB = 10^6 bytes of model.onnx)"))
    check_device(args.device, problems)
    fields = ("--corpus",) * 3 if args.corpus is not None else ("--train", "--eval", "--trials")
    listings = check_data(spec.data, problems, fields=fields, cache_dir=cache, train_subset=spec.train_subset)
    head_uses = [what for what, used in ((f"fine-tuning (--steps {args.steps})", args.steps > 0),
                                         ("the Hessian allocator (--budget-mb)", args.budget_mb is not None),
                                         ("the sensitivity order (--msft sensitivity)", args.msft == "sensitivity"))
                 if used]
    baseline = None
    try:
        if args.factory is not None:  # the network first, so its problems are the factory's, not the file's
            resolve_factory(args.factory, field="--factory")
            build_model(args.factory, **spec.arch_kwargs)
        baseline = check_model(args.model, spec.arch, spec.arch_kwargs, problems, need_head=head_uses)
    except ConfigError as err:
        problems.append(Problem("--factory", str(err)))
    recipe = None
    if baseline is not None:
        if baseline.has_head and listings.train is not None:
            n_classes, n_speakers = int(baseline.head["weight"].shape[0]), len(listings.train.speakers)
            if n_classes != n_speakers:
                problems.append(Problem("--model", f"the head has {n_classes} classes but {listings.train.root} has "
                                        f"{n_speakers} speakers; fine-tune on the data the baseline was trained on"))
        if args.recipe is not None:
            try:
                recipe = BitRecipe.load(args.recipe)
                recipe.validate(baseline.model)
            except ConfigError as err:
                problems.append(Problem("--recipe", str(err)))
        if args.budget_mb is not None and args.budget_mb > 0:
            smallest = packed_size_bytes(baseline.model, BitRecipe.uniform(
                baseline.model, 1, mode=LayerSpec(1, args.binary_mode).mode))
            if smallest > args.budget_mb * 1e6:
                problems.append(Problem("--budget-mb", f"{args.budget_mb:g} MB is below the smallest model "
                                        f"({smallest:,} bytes: every layer at 1 bit)"))
    if problems:
        raise PreflightFailed(problems, what="the quantization")
    return baseline, recipe


def _run(args: argparse.Namespace) -> int:
    from search.config import load_study_config
    from search.lease import LeaseLost
    from search.redaction import redacted
    from search.study import StudyInterrupted, run_study
    from search.tracking import StudyTracker

    config = load_study_config(args.study, n_trials=args.n_trials)
    try:
        result = run_study(config, address=args.address, fresh=args.fresh, control_only=args.control_only)
    except LeaseLost as exc:
        console.print(f"[bold red]lease lost:[/] {exc}", soft_wrap=True)
        return EXIT_LEASE_LOST
    except StudyInterrupted as exc:
        console.print(f"[yellow]study {config.study.name} {exc}[/]")
        return EXIT_SIGTERM if exc.signum == signal.SIGTERM else EXIT_INTERRUPTED
    st = result.status
    console.print(f"[green]study {config.study.name}[/] {'resumed' if result.resumed else 'created'} in "
                  f"{result.wall_s:.0f} s -> {result.study_dir}")
    console.print(st.line())
    console.print(st.cost.line())
    tracker = StudyTracker(config.mlflow_uri, config.study.name)
    if config.mlflow_uri.startswith("sqlite:"):
        console.print(f"browse: mlflow ui --backend-store-uri {redacted(config.mlflow_uri)} --host 127.0.0.1, then "
                      f"{tracker.runs_url()}")
    else:
        console.print(f"browse: {redacted(config.mlflow_uri).rstrip('/')}/#/experiments/{tracker.experiment_id}/runs")
    if st.n_failed:
        console.print(f"[red]{st.n_failed} trial(s) failed[/]:")
        for reason, n in sorted(st.failure_reasons.items(), key=lambda kv: -kv[1]):
            console.print(f"  {n} x {reason}", soft_wrap=True)
        return EXIT_FAILED_TRIALS
    return EXIT_OK


def _status(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from search.config import load_study_config
    from search.results import study_status
    from search.storage import read_record

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
    from search.selection import SelectionRule

    if args.max_eer is None and args.max_size_mb is None and not args.knee:
        return None
    return SelectionRule(max_eer=args.max_eer, max_size_mb=args.max_size_mb, knee=args.knee)


def _status_selected(study: Any, rule: Any, as_json: bool) -> int:
    """Answer one anytime question from the study's record (no re-evaluation): the trial ``rule`` picks, as
    ``lsv export`` would pick it."""
    from search.describe import recipe_in_words
    from search.results import load_control, load_points
    from search.selection import select_trial

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
    from search.pareto import ci_knee_point, knee_point, smallest_not_worse_than, smallest_within_of
    from search.results import control_delta, load_control, load_points

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


def _verify(args: argparse.Namespace) -> int:
    from search.config import load_study_config
    from search.verify import VerifyPlan, verify_study

    config = load_study_config(args.study)
    which = "knee" if args.knee else ("trials" if args.trials else "front")
    plan = VerifyPlan(which=which, trials=tuple(args.trials or ()), seeds=args.seeds, steps_mult=args.steps_mult)
    report = verify_study(config, plan, address=args.address, toml=str(args.study))
    for line in report.lines():
        console.print(line, soft_wrap=True)
    return EXIT_OK


def _export(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from search.config import load_study_config
    from search.selection import SelectionRule
    from search.trial_export import ExportOptions, export_trial

    config = load_study_config(args.study)
    _refuse_bad_folders({"--out": args.out}, "the export")
    rule = SelectionRule(trial=args.trial, max_size_mb=args.max_size_mb, max_eer=args.max_eer, knee=args.knee,
                         knee_ci=args.knee_ci, not_worse_than_control=args.not_worse_than_control,
                         within_pp=args.within_pp)
    options = ExportOptions(force=args.force, register=not args.no_register, eer_tolerance=args.eer_tolerance,
                            alias=args.alias, require_verified=args.require_verified,
                            float_onnx=args.float_onnx)
    result = export_trial(config, rule, args.out, options)
    for note in result.notes:
        console.print(f"[yellow]warning:[/] {note}")
    console.print(f"[green]exported[/] {result.line()}")
    print(json.dumps(asdict(result), indent=2, default=str))
    return 0


def _add_loading_flags(p: argparse.ArgumentParser) -> None:
    from lsv_core.data.loader import FEATURE_MODES, DataLoading
    from lsv_core.settings import default_of

    p.add_argument("--features", choices=FEATURE_MODES, default=default_of(DataLoading, "features"),
                   help="where features come from: memory, the sharded store in --cache, audio (fbank on the "
                   "fly), or auto (memory when small)")
    p.add_argument("--loader-workers", type=setting_flag(DataLoading, "loader_workers", int),
                   default=default_of(DataLoading, "loader_workers"),
                   help="DataLoader worker processes for training batches (default: 0 on CPU, 4 on GPU)")


def _add_corpus_parser(sub: argparse._SubParsersAction) -> None:
    """`lsv corpus synth`."""
    from lsv_core.data.synth import DEFAULT_EVAL_SPEAKERS, DEFAULT_SEED, DEFAULT_SPEAKERS, DEFAULT_UTTS

    corpus = sub.add_parser("corpus", help="embedded synthetic corpus").add_subparsers(dest="action", required=True)
    s = corpus.add_parser("synth", help="generate the deterministic espeak-ng multi-speaker corpus")
    s.add_argument("--out", required=True, type=Path)
    s.add_argument("--speakers", type=Bounded(int, ge=2), default=DEFAULT_SPEAKERS,
                   help="total speakers (train + eval)")
    s.add_argument("--utts", type=Bounded(int, ge=2), default=DEFAULT_UTTS, help="utterances per speaker")
    s.add_argument("--eval-speakers", type=Bounded(int, ge=1), default=DEFAULT_EVAL_SPEAKERS)
    s.add_argument("--seed", type=SEED, default=DEFAULT_SEED)
    s.add_argument("--workers", type=WORKERS, default=2)
    s.add_argument("--force", action="store_true", help="replace an existing corpus")
    s.set_defaults(func=_corpus_synth)


def _add_train_parser(sub: argparse._SubParsersAction) -> None:
    """`lsv train`."""
    t = sub.add_parser("train", help="train a baseline speaker-embedding network (AAM-softmax)")
    t.add_argument("--corpus", help="corpus root holding train/, eval/ and eval/trials")
    t.add_argument("--train", help="Kaldi data dir or VoxCeleb folder to train on")
    t.add_argument("--eval", help="data to evaluate on")
    t.add_argument("--trials", help="trial list over --eval")
    t.add_argument("--out", required=True, type=Path, help="checkpoint path (.safetensors); summary goes to .json")
    t.add_argument("--config", help="JSON file of TrainConfig fields")
    t.add_argument("--model")
    t.add_argument("--m-channels", type=Bounded(int, ge=1))
    t.add_argument("--steps", type=Bounded(int, ge=1))
    t.add_argument("--batch-size", type=Bounded(int, ge=1))
    t.add_argument("--optimizer", choices=["sgd", "adam"])
    t.add_argument("--lr", type=Bounded(float, gt=0))
    t.add_argument("--seed", type=SEED)
    t.add_argument("--time-budget-s", type=Bounded(float, gt=0))
    t.add_argument("--device", help="auto | cpu | cuda[:N]")
    t.add_argument("--cache", type=Path, help="feature cache folder")
    t.add_argument("--force", action="store_true", help="replace an existing checkpoint")
    t.set_defaults(func=_train)


def _add_evaluate_parser(sub: argparse._SubParsersAction) -> None:
    """`lsv evaluate`."""
    e = sub.add_parser("evaluate", help="score a model on a trial list (EER %%, minDCF, bootstrap CI)")
    e.add_argument("--model", required=True, type=Path, help="our checkpoint (.safetensors), a packed model, "
                   "or a WeSpeaker avg_model.pt (then give --arch)")
    e.add_argument("--arch", help="architecture name for a WeSpeaker .pt checkpoint, e.g. ResNet34")
    e.add_argument("--data", required=True, type=Path)
    e.add_argument("--trials", required=True, type=Path)
    e.add_argument("--cohort", type=Path, help="data for AS-norm's cohort (enables AS-norm)")
    e.add_argument("--cache", type=Path, help="feature cache folder")
    _add_loading_flags(e)
    e.add_argument("--n-boot", type=Bounded(int, ge=1), default=1000, help="bootstrap replicates for the EER CI")
    e.add_argument("--json", type=Path, help="also write the result here")
    e.add_argument("--force", action="store_true")
    e.set_defaults(func=_evaluate)


def _add_quantize_parser(sub: argparse._SubParsersAction) -> None:
    """`lsv quantize`."""
    from lsv_core.data.subset import TrainingSubset
    from lsv_core.quant.codebook import CENTROID_UPDATES, KMQATConfig
    from lsv_core.quant.msft import ORDERS, MsftSchedule
    from lsv_core.quant.recipe import ALLOWED_BITS, DEFAULT_BINARY_MODE, binary_modes
    from lsv_core.settings import default_of

    q = sub.add_parser("quantize", help="quantize a baseline with a bit recipe (k-means codebooks + MSFT)")
    q.add_argument("--model", required=True, type=Path, help="baseline checkpoint written by `lsv train`, or a "
                   "WeSpeaker avg_model.pt with its AAM head (then give --arch)")
    which = q.add_mutually_exclusive_group()
    which.add_argument("--arch", help="architecture of a WeSpeaker .pt checkpoint, e.g. ResNet34")
    which.add_argument("--factory", help="or a model factory 'package.module:function' returning the network of a "
                       ".pt state dict (a plugin, docs/plugins.md)")
    q.add_argument("--arch-kwargs", help='its arguments as JSON, e.g. \'{"embed_dim": 256}\' (WeSpeaker defaults otherwise)')
    how = q.add_mutually_exclusive_group(required=True)
    how.add_argument("--bits", type=int, choices=ALLOWED_BITS, help="uniform precision")
    how.add_argument("--recipe", type=Path, help="recipe file (.json or .toml): layer -> bits")
    how.add_argument("--budget-mb", type=Bounded(float, gt=0),
                     help="mixed precision from the Hessian allocator (MB = 1e6 B)")
    q.add_argument("--binary-mode", choices=binary_modes(), default=DEFAULT_BINARY_MODE)
    q.add_argument("--msft", choices=ORDERS, default=default_of(MsftSchedule, "order"),
                   help="stage order of multi-stage fine-tuning (one_shot: all layers at once)")
    q.add_argument("--steps", type=setting_flag(MsftSchedule, "total_steps", int),
                   default=default_of(MsftSchedule, "total_steps"),
                   help="total fine-tuning steps (0: k-means only)")
    q.add_argument("--lr", type=setting_flag(MsftSchedule, "lr", float), default=default_of(MsftSchedule, "lr"))
    q.add_argument("--batch-size", type=setting_flag(MsftSchedule, "batch_size", int),
                   default=default_of(MsftSchedule, "batch_size"),
                   help="fine-tuning batch size (crops per step)")
    q.add_argument("--centroids", choices=CENTROID_UPDATES, default=default_of(KMQATConfig, "centroid_update"),
                   help="how centroids adapt during fine-tuning")
    q.add_argument("--corpus", help="corpus root holding train/, eval/ and eval/trials")
    q.add_argument("--train", help="training data: Kaldi dir or VoxCeleb folder (the baseline's speakers)")
    q.add_argument("--eval", help="evaluation data: Kaldi dir or VoxCeleb folder")
    q.add_argument("--trials", help="trial list over --eval (VoxCeleb or Kaldi form)")
    q.add_argument("--train-speakers", type=setting_flag(TrainingSubset, "speakers", int),
                   default=default_of(TrainingSubset, "speakers"),
                   help="fine-tune on this many random training speakers (seeded by --seed)")
    q.add_argument("--train-utts-per-speaker", type=setting_flag(TrainingSubset, "utts_per_speaker", int),
                   default=default_of(TrainingSubset, "utts_per_speaker"),
                   help="and at most this many random utterances of each")
    _add_loading_flags(q)
    q.add_argument("--max-trials", type=Bounded(int, ge=1), help="evaluate on a seeded subset of the trials")
    q.add_argument("--cache", type=Path, help="feature (and Hessian-trace) cache folder")
    q.add_argument("--seed", type=SEED, default=0)
    q.add_argument("--device", default="auto")
    q.add_argument("--out", type=Path, help="write the packed model here (.safetensors)")
    q.add_argument("--json", type=Path, help="write EER, minDCF, bytes, compression and stages here")
    q.add_argument("--force", action="store_true")
    q.set_defaults(func=_quantize)


def _add_data_parser(sub: argparse._SubParsersAction) -> None:
    """`lsv data cache | audit | prepare voxceleb`."""
    from lsv_core.data.store import StoreConfig
    from lsv_core.settings import default_of

    data = sub.add_parser("data", help="prepare, check and cache data").add_subparsers(dest="action", required=True)
    dc = data.add_parser("cache", help="build the content-keyed feature store of a data dir ahead of a study")
    dc.add_argument("data", type=Path, help="Kaldi data dir or VoxCeleb folder")
    dc.add_argument("--cache", type=Path, default=Path("runs/cache"), help="cache folder (a study's data.cache_dir)")
    dc.add_argument("--dtype", choices=("float16", "float32"), default=default_of(StoreConfig, "dtype"))
    dc.add_argument("--shard-utts", type=setting_flag(StoreConfig, "shard_utts", int),
                    default=default_of(StoreConfig, "shard_utts"))
    dc.add_argument("--workers", type=WORKERS, help="processes computing fbank (default: the CPU count, at most 8)")
    dc.set_defaults(func=_data_cache)
    da = data.add_parser("audit", help="check every audio file (readable, non-empty, 16 kHz, long enough)")
    da.add_argument("data", type=Path, help="Kaldi data dir or VoxCeleb folder")
    da.add_argument("--cache", type=Path, help="remember files that passed here (by content)")
    da.add_argument("--workers", type=WORKERS)
    da.set_defaults(func=_data_audit)
    dp = data.add_parser("prepare", help="turn a downloaded corpus into Kaldi data dirs and trial lists")
    prep = dp.add_subparsers(dest="corpus", required=True)
    vox = prep.add_parser("voxceleb", help="VoxCeleb1/2 download layout -> vox1/, vox2_dev/, Vox1-O/E/H trials")
    vox.add_argument("--root", required=True, type=Path, help="folder holding the VoxCeleb downloads")
    vox.add_argument("--out", required=True, type=Path, help="folder to create")
    vox.add_argument("--convert-m4a", action="store_true", help="decode .m4a once to 16 kHz WAV under OUT/wav")
    vox.add_argument("--workers", type=WORKERS)
    vox.add_argument("--force", action="store_true", help="replace an existing --out folder")
    vox.set_defaults(func=_data_prepare_voxceleb)


def _add_run_parser(sub: argparse._SubParsersAction) -> None:
    """`lsv run`."""
    r = sub.add_parser("run", help="run or resume a bit-width search study (Optuna + Ray + MLflow)")
    r.add_argument("study", type=Path, help="study config (.toml), e.g. studies/quickstart.toml")
    r.add_argument("--address", help="Ray cluster address HOST:PORT (default: a local Ray)")
    r.add_argument("--n-trials", type=Bounded(int, ge=1), help="override study.n_trials")
    r.add_argument("--control-only", action="store_true",
                   help="run only the study's fp32 control (fine-tuned like a trial, nothing quantized)")
    r.add_argument("--fresh", action="store_true",
                   help="start over: the existing study folder is moved aside (never deleted)")
    r.set_defaults(func=_run)


def _add_status_parser(sub: argparse._SubParsersAction) -> None:
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


def _add_verify_parser(sub: argparse._SubParsersAction) -> None:
    """`lsv verify`."""
    from lsv_core.settings import default_of
    from search.verify import VerifyPlan

    v = sub.add_parser("verify", help="re-run front / knee / given trials with other seeds and longer fine-tuning")
    v.add_argument("study", type=Path, help="study config (.toml)")
    which = v.add_mutually_exclusive_group()
    which.add_argument("--front", action="store_true", help="every point of the Pareto front (default)")
    which.add_argument("--knee", action="store_true", help="the knee only")
    which.add_argument("--trials", type=TRIAL_NUMBER, nargs="+", help="these Optuna trial numbers")
    v.add_argument("--seeds", type=Bounded(int, ge=1), default=default_of(VerifyPlan, "seeds"),
                   help="fine-tuning seeds per point (other than the study's)")
    v.add_argument("--steps-mult", type=Bounded(float, gt=0), default=default_of(VerifyPlan, "steps_mult"),
                   help="fine-tuning steps as a multiple of the study's")
    v.add_argument("--address", help="Ray cluster address HOST:PORT (default: a local Ray)")
    v.set_defaults(func=_verify)


def _add_export_parser(sub: argparse._SubParsersAction) -> None:
    """`lsv export`."""
    from lsv_core.settings import default_of
    from search.trial_export import ExportOptions

    ex = sub.add_parser("export", help="verify one trial and export it (model.onnx with codebooks, torch-free "
                                       "infer.py, packed model, WeSpeaker .pt for WeSpeaker architectures, model card)")
    ex.add_argument("study", type=Path, help="study config (.toml)")
    pick = ex.add_mutually_exclusive_group(required=True)
    pick.add_argument("--trial", type=TRIAL_NUMBER, help="this Optuna trial number")
    pick.add_argument("--max-size-mb", type=Bounded(float, gt=0),
                      help="lowest EER with model size <= X MB (1e6 bytes of model.onnx)")
    pick.add_argument("--max-eer", type=Bounded(float, ge=0, le=100), help="smallest model with EER <= Y percent")
    pick.add_argument("--knee", action="store_true", help="the knee of the Pareto front")
    pick.add_argument("--knee-ci", action="store_true",
                      help="the smallest model not significantly worse than the knee (paired bootstrap)")
    pick.add_argument("--not-worse-than-control", action="store_true",
                      help="the smallest model not significantly worse than the study's fp32 control")
    pick.add_argument("--within-pp", type=Bounded(float, ge=0),
                      help="the smallest model within X EER points of the fp32 control")
    ex.add_argument("--require-verified", action="store_true",
                    help="refuse a trial `lsv verify` has not re-run")
    ex.add_argument("--out", required=True, type=Path, help="folder to create")
    ex.add_argument("--force", action="store_true",
                    help="replace an existing --out folder, only if it is a bundle lsv export wrote")
    ex.add_argument("--float-onnx", action="store_true",
                    help="also write model.float.onnx, the dequantized float network (for runtimes that want it)")
    ex.add_argument("--no-register", action="store_true", help="skip the MLflow Model Registry")
    ex.add_argument("--alias", default=default_of(ExportOptions, "alias"),
                    help="registry alias to point at the new version")
    ex.add_argument("--eer-tolerance", type=Bounded(float, ge=0), default=default_of(ExportOptions, "eer_tolerance"),
                    help="allowed |re-evaluated - logged| EER in percent points, checked before anything is "
                    "written (model.onnx is compared with the torch model by embeddings and trial scores, "
                    "not by EER)")
    ex.set_defaults(func=_export)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lsv", description="Bit-width search for speaker-verification networks.")
    sub = p.add_subparsers(dest="command", required=True)
    for add_parser in (_add_corpus_parser, _add_train_parser, _add_evaluate_parser, _add_quantize_parser,
                       _add_data_parser, _add_run_parser, _add_status_parser, _add_verify_parser, _add_export_parser):
        add_parser(sub)
    for command in entry_points(group=COMMAND_GROUP):  # e.g. `lsv report`, from the dashboards package
        command.load()(sub)
    return p


def _show_library_log() -> None:
    """Library decisions worth a line (e.g. which feature source was chosen) go to the console."""
    import logging

    from rich.logging import RichHandler

    logger = logging.getLogger("lsv")
    if not logger.handlers:
        logger.addHandler(RichHandler(console=console, show_time=False, show_path=False))
        logger.setLevel(logging.INFO)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _show_library_log()
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except LsvError as exc:
        from search.redaction import scrub_known

        console.print(f"[bold red]error:[/] {scrub_known(str(exc))}")  # no password, whatever raised it
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]")
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
