"""``lsv quantize``: quantize a baseline with a bit recipe (k-means codebooks + MSFT)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from lsv_core.atomic import write_text_atomic
from lsv_core.errors import LsvError
from search.cli.arguments import add_loading_flags, arch_kwargs, corpus_paths, loading
from search.cli.output import console
from search.flags import SEED, Bounded, setting_flag


def _quantize(args: argparse.Namespace) -> int:
    from lsv_core.data.subset import TrainingSubset
    from lsv_core.export.packed import save_packed
    from lsv_core.quant import BitRecipe
    from lsv_core.quant.codebook import KMQATConfig
    from lsv_core.quant.msft import MsftSchedule
    from lsv_core.quant.sensitivity import allocate_bits
    from lsv_core.workbench import DataPaths, Workbench, WorkbenchSpec

    train_dir, eval_dir, trials = corpus_paths(args)
    if eval_dir is None or trials is None:
        raise LsvError("quantize needs evaluation data: --corpus DIR, or --eval DIR and --trials FILE")
    schedule = MsftSchedule(order=args.msft, total_steps=args.steps, lr=args.lr, seed=args.seed,
                            batch_size=args.batch_size, kmqat=KMQATConfig(centroid_update=args.centroids))
    spec = WorkbenchSpec(checkpoint=args.model, data=DataPaths(train_dir, eval_dir, trials), cache_dir=args.cache,
                         max_trials=args.max_trials, subset_seed=args.seed, device=args.device,
                         arch=args.factory or args.arch,
                         arch_kwargs=arch_kwargs(args.arch_kwargs),
                         loading=loading(args),
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
    from search.study.preflight import (
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


def add_quantize_parser(sub: argparse._SubParsersAction) -> None:
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
    add_loading_flags(q)
    q.add_argument("--max-trials", type=Bounded(int, ge=1), help="evaluate on a seeded subset of the trials")
    q.add_argument("--cache", type=Path, help="feature (and Hessian-trace) cache folder")
    q.add_argument("--seed", type=SEED, default=0)
    q.add_argument("--device", default="auto")
    q.add_argument("--out", type=Path, help="write the packed model here (.safetensors)")
    q.add_argument("--json", type=Path, help="write EER, minDCF, bytes, compression and stages here")
    q.add_argument("--force", action="store_true")
    q.set_defaults(func=_quantize)
