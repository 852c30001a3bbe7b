"""Export one trial of a study as a deployable, verified, registered model, in four steps.

``export_trial(config, SelectionRule(...), out_dir)``:

1. **select** the trial (:mod:`search.results.selection`), after refusing an ``out_dir`` that is, lies inside or
   contains the study folder, or that exists and is not a bundle export wrote
   (:func:`lsv_core.export.bundle.check_out_dir`; ``--force`` replaces only such a bundle);
2. **verify** it (:func:`verify_trial`), before anything is written: the trial's packed file (on this
   machine, else the copy logged with its MLflow run) carries the logged recipe, that recipe names only
   layers of the model, the file holds exactly the tensor bytes the recipe needs, the logged
   ``size_bytes`` is the byte count of the deployable ``model.onnx`` for that recipe (the size
   objective), and re-evaluated on the study's trials (same data, ``max_trials`` subset, seed, bootstrap
   replicates and torch threads as the workers) it gives the logged EER within :data:`EER_TOLERANCE`
   points (``--eer-tolerance``; the refusal says what one trial is worth on the subset). Evaluation is
   deterministic on one machine, so the difference is 0.0 in practice; the tolerance only absorbs float
   reordering between BLAS builds or devices. The re-evaluation's scores
   give the decision thresholds ``infer.py`` uses (at the EER, and at minDCF with p_target 0.01);
3. **write** the bundle (:func:`lsv_core.export.bundle.stage_bundle`: ``model.onnx``, ``infer.py``,
   packed copy, WeSpeaker state dict for WeSpeaker architectures, recipe with provenance, model card), staged
   beside ``out_dir``;
   ``model.onnx`` is run in onnxruntime on every evaluation utterance of the trials: its embeddings must
   match the torch model's (cosine >= 0.9999) and so must every trial's score (within 1e-3), what is meant
   to be equal; its EER is reported, not compared (one trial at the threshold would flip on a small subset);
4. **register** it in the MLflow Model Registry of the study's tracking store
   (:meth:`~search.results.tracking.StudyTracker.register_bundle`: files under ``export/`` of the trial's run, a
   new version of ``lsv-<study>``, the alias (default ``chosen``) pointing at it; load it with
   ``models:/lsv-<study>@chosen``), then move the bundle into place.

Every refusal is an :class:`~lsv_core.errors.LsvError` (CLI exit 2); nothing is written before step 3.
A study sized before the size objective counted the whole ``model.onnx`` (it logged tensor bytes) is
still exported, with a note saying so.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from lsv_core.errors import ConfigError, LsvError
from lsv_core.export.bundle import (
    PACKED_NAME,
    Accuracy,
    BundleFacts,
    OnnxAgreement,
    check_out_dir,
    packed_file_sizes,
    stage_bundle,
)
from search.results.pareto import TrialPoint
from search.results.selection import SelectionRule, select_trial

if TYPE_CHECKING:
    from mlflow.entities import Run
    from torch import nn

    from lsv_core.evaluate import EvalResult
    from lsv_core.metrics.thresholds import OperatingPoint
    from lsv_core.quant import BitRecipe
    from lsv_core.workbench import Workbench
    from search.config import StudyConfig
    from search.results.record import StudyRecord
    from search.results.tracking import StudyTracker

__all__ = ["EER_TOLERANCE", "ExportMismatch", "ExportOptions", "ExportResult", "VerifiedTrial", "export_trial",
           "reeval_mismatch", "verify_trial"]

EER_TOLERANCE = 0.05  # EER points (percent, absolute); see the module docstring
TRIAL_N_BOOT = 200  # bootstrap replicates a search worker uses (search/study/trial.py), so the CI matches too
DEFAULT_ALIAS = "chosen"


class ExportMismatch(LsvError):
    """The trial's files do not reproduce what the study logged (size, recipe or EER)."""


@dataclass(frozen=True)
class ExportOptions:
    """How to export: replace an existing ``out_dir`` that is a bundle written by export (``force``),
    register in MLflow (``register``) under ``model_name`` (default ``lsv-<study>``) with ``alias``, the
    EER tolerance of the verification, and whether to add the dequantized float ONNX (``float_onnx``)."""

    force: bool = False
    register: bool = True
    eer_tolerance: float = EER_TOLERANCE
    alias: str = DEFAULT_ALIAS
    model_name: str | None = None
    require_verified: bool = False  # refuse a trial `lsv verify` has not re-run
    float_onnx: bool = False

    def __post_init__(self) -> None:
        if not self.eer_tolerance >= 0:
            raise ConfigError(f"eer_tolerance={self.eer_tolerance!r} should be >= 0 (EER points)")


@dataclass
class ExportResult:
    """What :func:`export_trial` wrote and checked (EER in percent, sizes in bytes)."""

    out_dir: Path
    trial: int
    source_trial: int  # the trial whose files were exported (differs for a memoized trial)
    eer_logged: float
    eer_reevaluated: float
    size_bytes: int  # model.onnx, the deployable file (the size objective)
    tensor_bytes: int  # the packed tensors (model.packed.safetensors without its header)
    packed_file_bytes: int  # model.packed.safetensors
    onnx_max_abs_diff: float
    onnx_min_cosine: float
    onnx_eer: float | None
    thresholds: dict[str, float] = field(default_factory=dict)  # operating point -> cosine threshold
    files: dict[str, Path] = field(default_factory=dict)
    run_id: str | None = None
    registered_model: str | None = None
    model_version: str | None = None
    alias: str | None = None
    notes: list[str] = field(default_factory=list)  # warnings that did not stop the export

    def line(self) -> str:
        reg = (f"; registered {self.registered_model} v{self.model_version} (@{self.alias})"
               if self.model_version else "")
        return (f"trial {self.trial}: EER {self.eer_logged:.2f} % (re-evaluated {self.eer_reevaluated:.2f} %), "
                f"{self.size_bytes:,} bytes -> {self.out_dir}{reg}")


@dataclass
class VerifiedTrial:
    """A trial whose packed file reproduced the study's record (step 2)."""

    chosen: TrialPoint
    source: TrialPoint  # whose files these are (a memoized trial repeats an earlier one)
    model: nn.Module
    packed_file: Path
    reeval: EvalResult
    n_eval_trials: int
    run: Run | None
    thresholds: dict[str, OperatingPoint] = field(default_factory=dict)  # "eer", "min_dcf"
    embeddings: dict[str, Any] = field(default_factory=dict)  # utterance -> torch embedding (numpy)


# -- the four steps ------------------------------------------------------------------------------------------
def export_trial(config: StudyConfig, rule: SelectionRule, out_dir: str | os.PathLike[str],
                 options: ExportOptions = ExportOptions()) -> ExportResult:
    """Select, verify, write and register one trial (module docstring); returns what was written.

    Raises:
        RefuseOverwrite: ``out_dir`` exists and ``options.force`` is False (checked first and again at the end).
        ConfigError: ``out_dir`` is, lies inside or contains the study folder, or exists and is not a bundle
            written by export (even with ``force``); or the trial has no MLflow run to register.
        NoTrialMeetsRule: no complete trial satisfies ``rule``.
        ExportMismatch: the packed file, its recipe or the re-evaluation disagrees with the study's record.
        StudyNotRun: the study was never run.
    """
    from search.cluster.storage import read_record
    from search.results.reading import load_control, load_points
    from search.results.tracking import StudyTracker
    from search.results.verify import NoControl, verification_of

    out = Path(out_dir)
    check_out_dir(out, force=options.force, protected=[config.study_dir])
    record, study = read_record(config)
    notes: list[str] = []
    if record.digest != config.digest():
        # Not a refusal: a new config field with a default changes the digest too. The re-evaluation
        # below is the real check that the data and the model still give the logged result.
        notes.append(f"the study was made with config digest {record.digest}, this config has {config.digest()}")
    points = load_points(study)
    control = load_control(study)
    if rule.needs_control and control is None:
        raise NoControl(config.study.name)
    chosen = select_trial(points, rule, control)
    verification = verification_of(study, chosen.number)
    if options.require_verified and verification is None:
        raise LsvError(f"trial {chosen.number} has not been verified (--require-verified); run "
                       f"`lsv verify STUDY.toml --trials {chosen.number}` first")
    tracker = StudyTracker(config.mlflow_uri, config.study.name)
    bench = _workbench(config)
    with tempfile.TemporaryDirectory(prefix="lsv-export-") as scratch:
        checked = verify_trial(config, chosen, points, tracker, Path(scratch), options.eer_tolerance, notes,
                               bench=bench, record=record)
        if options.register and checked.run is None:
            raise ConfigError(f"trial {checked.source.number} has no MLflow run in {config.mlflow_uri}; cannot "
                              "register it (pass --no-register to export without the registry)")
        model_name = options.model_name or f"lsv-{config.study.name}"
        facts = _bundle_facts(config, record, study, checked, rule, len(points), options, model_name,
                              verification)
        with stage_bundle(checked.model, checked.packed_file, facts, near=out, float_onnx=options.float_onnx,
                          onnx_check=lambda path: _onnx_agreement(path, bench, checked)) as staged:
            version = None
            if options.register:
                assert checked.run is not None
                version = tracker.register_bundle(
                    checked.run.info.run_id, staged.dir, model_name, options.alias,
                    tags={"lsv.study": config.study.name, "lsv.optuna_trial": str(chosen.number),
                          "lsv.config_digest": str(record.digest), "lsv.recipe_digest": str(chosen.digest),
                          "lsv.version": str(facts.provenance["lsv_version"]),
                          "lsv.git_commit": str(facts.provenance["git_commit"]),
                          "eer": f"{chosen.eer:.4f}", "size_bytes": str(staged.size_bytes)},
                    description=f"trial {chosen.number}: EER {chosen.eer:.2f} %, {staged.size_bytes:,} bytes "
                                f"({rule.describe()})")
            staged.commit(out, overwrite=options.force)
    files = {p.name: out / p.name for p in sorted(out.iterdir())}
    return ExportResult(out_dir=out, trial=chosen.number, source_trial=checked.source.number, eer_logged=chosen.eer,
                        eer_reevaluated=checked.reeval.eer, size_bytes=staged.size_bytes,
                        tensor_bytes=staged.tensor_bytes, packed_file_bytes=staged.packed_file_bytes,
                        onnx_max_abs_diff=staged.onnx_max_abs_diff, onnx_min_cosine=staged.onnx_min_cosine,
                        onnx_eer=staged.onnx_eer, thresholds={k: v.threshold for k, v in checked.thresholds.items()},
                        files=files, run_id=checked.run.info.run_id if checked.run else None,
                        registered_model=model_name if options.register else None, model_version=version,
                        alias=options.alias if options.register else None, notes=notes)


def verify_trial(config: StudyConfig, chosen: TrialPoint, points: list[TrialPoint], tracker: StudyTracker,
                 scratch: Path, eer_tolerance: float = EER_TOLERANCE, notes: list[str] | None = None, *,
                 bench: Workbench | None = None, record: StudyRecord | None = None) -> VerifiedTrial:
    """Step 2: the trial's packed file reproduces its logged recipe, size and EER (module docstring).

    ``bench`` (the study's workbench, loaded here when None) supplies the evaluation data; ``record`` the
    baseline's layer names to check the recipe against.
    """
    from lsv_core.export.packed import load_packed
    from lsv_core.quant import BitRecipe, recipe_of

    notes = notes if notes is not None else []
    source = chosen
    if chosen.memoized_from is not None:  # a repeat of an earlier trial: its files are the earlier one's
        source = next((p for p in points if p.number == chosen.memoized_from), chosen)
    run = tracker.trial_run(source.number)
    packed = _packed_source(source, run, tracker, scratch)
    recipe = BitRecipe.from_mapping(dict(chosen.recipe))
    _check_packed_file(chosen, recipe, packed, record, notes)
    model = load_packed(packed)
    if recipe_of(model) != recipe:
        raise ExportMismatch(f"trial {chosen.number}: {packed} holds recipe {recipe_of(model).to_dict()}, "
                             f"the study logged {recipe.to_dict()}")
    bench = bench if bench is not None else _workbench(config)
    reeval, scores, embeddings = _reevaluate(config, model, bench)
    if not abs(reeval.eer - chosen.eer) <= eer_tolerance:
        raise ExportMismatch(reeval_mismatch(chosen.number, packed, reeval.eer, chosen.eer, eer_tolerance,
                                             bench.trials.labels) + "".join(f"; note: {n}" for n in notes))
    return VerifiedTrial(chosen, source, model, packed, reeval, len(bench.trials), run,
                         thresholds=_thresholds(scores, bench.trials.labels, config.objectives.p_target),
                         embeddings=embeddings)


def reeval_mismatch(number: int, packed: Path, reeval_eer: float, logged_eer: float, tolerance: float,
                    labels: Any) -> str:
    """The refusal when the re-evaluated EER is off: by how much, what one trial is worth on this many trials
    (a single flipped decision on a small ``max_trials`` subset is a big step) and the flag that allows more."""
    import numpy as np

    n_target = int(np.sum(labels == 1))
    n_nontarget = len(labels) - n_target
    step = 100.0 / max(1, min(n_target, n_nontarget))
    return (f"trial {number}: re-evaluating {packed} gives EER {reeval_eer:.4f} %, the study logged "
            f"{logged_eer:.4f} % (|difference| {abs(reeval_eer - logged_eer):.4f} > tolerance {tolerance:g} points); "
            f"on these {len(labels)} trials ({n_target} target) one changed decision moves the EER by up to "
            f"{step:.2g} points. The model or the evaluation data changed, or it was evaluated on another "
            f"device: to accept the difference pass --eer-tolerance {max(abs(reeval_eer - logged_eer), step):.2g}")


def _check_packed_file(chosen: TrialPoint, recipe: BitRecipe, packed: Path, record: StudyRecord | None,
                       notes: list[str]) -> None:
    """Before loading anything: the file's recipe and arch fit the logged recipe, its tensor bytes are the
    recipe's, and the logged size is the deployable file's (or, for an older study, the tensor bytes)."""
    from lsv_core.export.packed import read_packed_header
    from lsv_core.models import build_model
    from lsv_core.quant import packed_size_bytes, packed_tensor_bytes

    n = chosen.number
    header = read_packed_header(packed)
    if header["recipe"] != recipe:
        raise ExportMismatch(f"trial {n}: {packed} holds recipe {header['recipe'].to_dict()}, the study logged "
                             f"{recipe.to_dict()}")
    if record is not None and record.layers is not None:
        unknown = sorted(set(recipe) - set(record.layers))
        if unknown:
            raise ExportMismatch(f"trial {n}: the logged recipe names layers the study's baseline does not have: "
                                 f"{unknown[:5]} (baseline layers: {record.layers[:5]} ...)")
    arch = header["arch"]
    try:
        net = build_model(arch["name"], **arch.get("kwargs", {}))
        recipe.validate(net)
    except (ConfigError, KeyError, TypeError) as err:
        raise ExportMismatch(f"trial {n}: the recipe does not match the model in {packed}: {err}") from None
    file_bytes, header_bytes = packed_file_sizes(packed)
    tensors = packed_tensor_bytes(net, recipe)
    if file_bytes - header_bytes != tensors:
        raise ExportMismatch(
            f"trial {n}: {packed} holds {file_bytes - header_bytes:,} bytes of tensors ({file_bytes:,} - "
            f"{header_bytes:,} header), its recipe needs {tensors:,}; the file was altered or written for "
            f"another recipe")
    deployable = packed_size_bytes(net, recipe)
    if chosen.size_bytes == deployable:
        return
    if chosen.size_bytes == tensors:
        notes.append(f"trial {n} logged size_bytes={chosen.size_bytes:,}, the tensor bytes (how studies were sized "
                     f"before the size objective counted the whole deployable file); model.onnx is {deployable:,} "
                     "bytes")
        return
    raise ExportMismatch(f"trial {n}: the study logged size_bytes={chosen.size_bytes:,}, but model.onnx for its "
                         f"recipe is {deployable:,} bytes (tensors {tensors:,}); the study was sized by other code")


# -- helpers -------------------------------------------------------------------------------------------------
def _bundle_facts(config: StudyConfig, record: StudyRecord, study: Any, checked: VerifiedTrial,
                  rule: SelectionRule, n_complete: int, options: ExportOptions, model_name: str,
                  verification: dict[str, Any] | None = None) -> BundleFacts:
    from lsv_core import __version__
    from lsv_core.quant import average_bits, recipe_of
    from search.redaction import redacted

    chosen = checked.chosen
    commit, dirty = _git_commit()
    provenance: dict[str, Any] = {
        "study": config.study.name,
        "study_dir": str(config.study_dir),
        "optuna_storage": redacted(config.optuna_url),
        "optuna_trial": chosen.number,
        "memoized_from": chosen.memoized_from,
        "selection_rule": rule.describe(),
        "config_digest": record.digest,
        "export_config_digest": config.digest(),
        "recipe_digest": chosen.digest,
        "baseline_checkpoint": str(config.model.checkpoint.resolve()),
        "mlflow_tracking_uri": redacted(config.mlflow_uri),
        "mlflow_run_id": checked.run.info.run_id if checked.run is not None else None,
        "ray_trial_id": study.trials[checked.source.number].user_attrs.get("ray_trial_id"),
        "registered_model": f"{model_name}@{options.alias}" if options.register else None,
        "lsv_version": __version__,
        "git_commit": commit,
        "git_dirty": dirty,
        "exported_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "verification": _verification_text(verification),
    }
    reeval = checked.reeval
    p_target = config.objectives.p_target
    # A trial's logged minDCF is at the study's p_target ([objectives]); the card's line is at 0.01.
    dcf_001 = chosen.min_dcf if p_target == 0.01 else None
    other = {} if p_target == 0.01 else {"p_target": p_target, "min_dcf": chosen.min_dcf, "reeval_min_dcf": reeval.min_dcf}
    accuracy = Accuracy(eer=chosen.eer, eer_ci_low=chosen.eer_ci_low, eer_ci_high=chosen.eer_ci_high,
                        min_dcf_001=dcf_001, reeval_eer=reeval.eer, reeval_min_dcf_001=reeval.min_dcf_001,
                        eer_tolerance=options.eer_tolerance, n_eval_trials=checked.n_eval_trials, **other)
    metrics = {"eer": chosen.eer, "eer_ci_low": chosen.eer_ci_low, "eer_ci_high": chosen.eer_ci_high,
               "min_dcf_001": dcf_001, "min_dcf": chosen.min_dcf, "p_target": p_target, "eer_reevaluated": reeval.eer,
               "min_dcf_001_reevaluated": reeval.min_dcf_001, "min_dcf_reevaluated": reeval.min_dcf,
               "n_eval_trials": checked.n_eval_trials, "logged_size_bytes": chosen.size_bytes}
    title = (f"{config.study.name}, trial {chosen.number}: {checked.model.arch['name']} at "
             f"{average_bits(checked.model, recipe_of(checked.model)):.2f} bits/weight")
    evaluated_on = {"study": config.study.name, "trials": str(config.workbench_spec().data.trials),
                    "n_trials": checked.n_eval_trials, "max_trials": config.data.max_trials,
                    "subset_seed": config.data.subset_seed, "eer_percent": reeval.eer,
                    "min_dcf_001": reeval.min_dcf_001}
    return BundleFacts(title=title, accuracy=accuracy, provenance=provenance,
                       how_found=_how_found(config, chosen, rule, n_complete), metrics=metrics,
                       thresholds=checked.thresholds, evaluated_on=evaluated_on)


def _verification_text(verification: dict[str, Any] | None) -> str:
    """``lsv verify``'s re-runs of the trial, in one line (or that there were none)."""
    if not verification:
        return "not verified (lsv verify re-runs a recipe with other seeds and a longer fine-tune)"
    runs = verification["runs"]
    eers = [r["eer"] for r in runs]
    mean = sum(eers) / len(eers)
    sd = (sum((e - mean) ** 2 for e in eers) / (len(eers) - 1)) ** 0.5 if len(eers) > 1 else 0.0
    steps = sorted({r["total_steps"] for r in runs})
    return (f"{len(runs)} re-runs (seeds {sorted(r['seed'] for r in runs)}, {'/'.join(map(str, steps))} steps): "
            f"EER {mean:.2f} ± {sd:.2f} %")


def _how_found(config: StudyConfig, chosen: TrialPoint, rule: SelectionRule, n_complete: int) -> list[str]:
    origin = (f"an enqueued seed trial ({chosen.seed})" if chosen.seed
              else f"proposed by Optuna's {config.study.sampler} sampler")
    msft = config.msft
    return [
        f"Study `{config.study.name}`: {n_complete} complete trials, each quantizing the fp32 baseline "
        f"`{config.model.checkpoint}` with a per-{config.space.granularity} bit assignment from "
        f"{config.space.bits} (1-bit modes {config.space.binary_modes}).",
        f"Trial {chosen.number} was {origin}"
        + (f"; its result repeats trial {chosen.memoized_from} (same recipe, memoized)" if chosen.memoized_from
           is not None else "") + ".",
        f"Each trial: k-means codebooks per layer, then multi-stage fine-tuning (order `{msft.order}`, "
        f"{msft.total_steps} steps, lr {msft.lr:g}, centroids by `{msft.centroid_update}`), scored by cosine "
        f"EER on {config.data.max_trials or 'all'} trials (subset seed {config.data.subset_seed}).",
        f"Selected by the rule: {rule.describe()}; objectives minimised together: "
        + ("EER" if config.objectives.accuracy == "eer" else f"minDCF at p_target {config.objectives.p_target:g}")
        + " and packed bytes"
        + (f" (size budget {config.size_budget_bytes:,} bytes)" if config.size_budget_bytes else "") + ".",
    ]


def _git_commit() -> tuple[str, bool | None]:
    """``(commit, dirty)`` of the checkout this code runs from; ``("unknown", None)`` outside git."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return "unknown", None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10)
        return head.stdout.strip(), bool(dirty.stdout.strip()) if dirty.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return "unknown", None


def _workbench(config: StudyConfig) -> Workbench:
    """The study's evaluation data (and baseline), on the CPU, as the workers load it."""
    from lsv_core.workbench import Workbench

    return Workbench.load(config.workbench_spec().replace(device="cpu", codebook_dir=None), progress=False)


def _reevaluate(config: StudyConfig, model: nn.Module, bench: Workbench) -> tuple[EvalResult, Any, dict[str, Any]]:
    """``model`` on the study's trial subset, computed as a search worker computes it
    (:func:`lsv_core.evaluate.evaluate`, step by step to keep the scores and embeddings)."""
    from lsv_core.evaluate import extract_embeddings, metrics_of, score

    threads = torch.get_num_threads()
    # The workers ran with resources.cpu threads; the same count keeps float reductions in the same order.
    torch.set_num_threads(max(1, int(config.resources.cpu)))
    try:
        embeddings = extract_embeddings(model, bench.eval_store, bench.trials.utterances)
        scores = score(bench.trials, embeddings)
        result = metrics_of(scores, bench.trials.labels, n_boot=TRIAL_N_BOOT, seed=config.study.seed,
                            p_target=config.objectives.p_target)
    finally:
        torch.set_num_threads(threads)
    # Rounded as the searcher stores a trial's metrics (search.objectives): a deterministic re-evaluation
    # then equals the logged value exactly.
    from dataclasses import replace

    from search.objectives import rounded

    result = replace(result, **{k: rounded(k, getattr(result, k)) for k in (
        "eer", "eer_ci_low", "eer_ci_high", "min_dcf", "min_dcf_001", "min_dcf_005")})
    return result, scores, embeddings


def _thresholds(scores: Any, labels: Any, p_target: float = 0.01) -> dict[str, OperatingPoint]:
    """infer.py's operating points, from the re-evaluation's scores (minDCF at the study's p_target)."""
    from lsv_core.metrics.thresholds import eer_threshold, min_dcf_threshold

    return {"eer": eer_threshold(scores, labels), "min_dcf": min_dcf_threshold(scores, labels, p_target=p_target)}


def _onnx_agreement(path: Path, bench: Workbench, checked: VerifiedTrial) -> OnnxAgreement:
    """``path`` (the written model.onnx) in onnxruntime on every utterance of the trials, batched like the
    re-evaluation: the lowest cosine to the torch embedding and the EER of its scores."""
    import numpy as np

    from lsv_core.evaluate import score
    from lsv_core.export.inference import onnx_embeddings, onnx_session
    from lsv_core.metrics import compute_eer

    emb = onnx_embeddings(onnx_session(path), bench.eval_store, bench.trials.utterances)
    cosines = [float(np.dot(emb[u], checked.embeddings[u]) / max(1e-30, float(
        np.linalg.norm(emb[u]) * np.linalg.norm(checked.embeddings[u])))) for u in emb]
    scores = score(bench.trials, emb)
    diff = float(np.abs(np.asarray(scores) - np.asarray(score(bench.trials, checked.embeddings))).max())
    return OnnxAgreement(eer=compute_eer(scores, bench.trials.labels), min_cosine=min(cosines),
                         n_utterances=len(emb), max_score_diff=diff)


def _packed_source(point: TrialPoint, run: Run | None, tracker: StudyTracker, scratch: Path) -> Path:
    """The trial's packed file: where the worker wrote it, else the copy logged with its MLflow run."""
    if point.packed_path and Path(point.packed_path).is_file():
        return Path(point.packed_path)
    if run is not None:
        try:
            return Path(tracker.client.download_artifacts(run.info.run_id, PACKED_NAME, str(scratch)))
        except Exception as err:  # MLflow raises several types for a missing artifact
            raise ExportMismatch(f"trial {point.number}: packed file {point.packed_path!r} is gone and its MLflow "
                                 f"run {run.info.run_id} has no {PACKED_NAME} artifact ({err})") from None
    raise ExportMismatch(f"trial {point.number}: packed file {point.packed_path!r} does not exist and no MLflow "
                         "run holds a copy")
