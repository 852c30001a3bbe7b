"""Export one trial of a study as a deployable, verified, registered model.

``export_model(config, SelectionRule(...), out_dir)`` picks a trial (a trial number, the best EER under a
size, the smallest model under an EER, or the knee of the front), then *checks before it writes*:

1. the study was made with this config (digest of ``study.json``);
2. the trial's packed file holds exactly the logged ``size_bytes`` of tensors (file size minus the
   safetensors header: an 8-byte length and the header JSON) and loads with the logged recipe;
3. the loaded packed model, re-evaluated on the study's trials (same data, ``max_trials`` subset, seed,
   bootstrap replicates, torch threads as the workers), gives the logged EER within
   :data:`EER_TOLERANCE` points. Evaluation is deterministic on one machine, so the difference is 0.0
   in practice (the tests check that); the tolerance only absorbs float reordering between BLAS
   builds or devices (a worker on a GPU).

Only then does it write, into a temporary folder beside ``out_dir`` that is renamed at the end:

* ``recipe.json``: the recipe (``BitRecipe.load`` reads it) plus provenance and metrics;
* ``model.packed.safetensors``: a copy of the trial's packed file (round trip checked);
* ``wespeaker_avg_model.pt``: the dequantized state dict in WeSpeaker's layout (strict load checked);
* ``model.onnx``: the dequantized network (onnxruntime vs torch within 1e-4 at two input lengths);
* ``model_card.md``.

and registers the bundle in the MLflow Model Registry of the study's tracking store: the files are
logged under ``export/`` of the trial's run, a model version with that source is created in the
registered model ``lsv-<study>`` and the alias (default ``chosen``) points at it; load it with
``models:/lsv-<study>@chosen``. Every refusal is an :class:`~lsv_core.errors.LsvError` (CLI exit 2).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from dashboards.pareto import (
    TrialPoint,
    best_eer_with_size_at_most,
    knee_point,
    load_points,
    smallest_with_eer_at_most,
)
from lsv_core.atomic import RefuseOverwrite
from lsv_core.errors import ConfigError, LsvError

if TYPE_CHECKING:
    from mlflow.entities import Run
    from torch import nn

    from lsv_core.evaluate import EvalResult
    from search.config import StudyConfig
    from search.tracking import StudyTracker

__all__ = ["EER_TOLERANCE", "ExportMismatch", "ExportResult", "NoTrialMeetsRule", "SelectionRule", "export_model",
           "select_trial"]

EER_TOLERANCE = 0.05  # EER points (percent, absolute); see the module docstring
TRIAL_N_BOOT = 200  # bootstrap replicates a search worker uses (search/trial.py), so the CI matches too
PACKED_NAME = "model.packed.safetensors"  # also the artifact name of a trial run (search/searcher.py)
DEFAULT_ALIAS = "chosen"


class NoTrialMeetsRule(LsvError):
    """No complete trial satisfies the selection rule; the message lists the closest ones."""


class ExportMismatch(LsvError):
    """The trial's files do not reproduce what the study logged (size, recipe or EER)."""


@dataclass(frozen=True)
class SelectionRule:
    """Which trial to export; give exactly one field.

    * ``trial``: that Optuna trial number;
    * ``max_size_mb``: the lowest EER among trials of at most this many MB (10^6 bytes of packed tensors);
    * ``max_eer``: the smallest trial with an EER of at most this many percent points;
    * ``knee``: the knee of the Pareto front (:func:`dashboards.pareto.knee_point`).
    """

    trial: int | None = None
    max_size_mb: float | None = None
    max_eer: float | None = None
    knee: bool = False

    def __post_init__(self) -> None:
        given = [k for k in ("trial", "max_size_mb", "max_eer") if getattr(self, k) is not None] + (
            ["knee"] if self.knee else [])
        if len(given) != 1:
            raise ConfigError(f"give exactly one of trial, max_size_mb, max_eer, knee (got {given or 'none'})")
        if self.max_size_mb is not None and not self.max_size_mb > 0:
            raise ConfigError(f"max_size_mb={self.max_size_mb!r} should be > 0")
        if self.max_eer is not None and not 0 <= self.max_eer <= 100:
            raise ConfigError(f"max_eer={self.max_eer!r} should be an EER in percent, 0 to 100")
        if self.trial is not None and self.trial < 0:
            raise ConfigError(f"trial={self.trial!r} should be an Optuna trial number >= 0")

    def describe(self) -> str:
        if self.trial is not None:
            return f"trial {self.trial}"
        if self.max_size_mb is not None:
            return f"lowest EER with size <= {self.max_size_mb:g} MB ({int(self.max_size_mb * 1e6):,} bytes)"
        if self.max_eer is not None:
            return f"smallest model with EER <= {self.max_eer:g} %"
        return "knee of the Pareto front"


@dataclass
class ExportResult:
    """What :func:`export_model` wrote and checked (EER in percent, sizes in bytes)."""

    out_dir: Path
    trial: int
    source_trial: int  # the trial whose files were exported (differs for a memoized trial)
    eer_logged: float
    eer_reevaluated: float
    size_bytes: int
    file_bytes: int
    onnx_max_abs_diff: float
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


# -- selection ------------------------------------------------------------------------------------------
def _closest(points: Sequence[TrialPoint], key: Any, n: int = 3) -> str:
    near = sorted(points, key=key)[:n]
    if not near:
        return " The study has no complete trials."
    rows = "; ".join(f"trial {p.number}: EER {p.eer:.2f} %, {p.size_bytes:,} bytes" for p in near)
    return f" Closest: {rows}."


def select_trial(points: Sequence[TrialPoint], rule: SelectionRule) -> TrialPoint:
    """The complete trial ``rule`` picks; raises :class:`NoTrialMeetsRule` listing the 3 closest otherwise."""
    if not points:
        raise NoTrialMeetsRule(f"no trial meets the rule ({rule.describe()}): the study has no complete trials")
    if rule.trial is not None:
        match = [p for p in points if p.number == rule.trial]
        if match:
            return match[0]
        raise NoTrialMeetsRule(f"trial {rule.trial} is not a complete trial of the study."
                               + _closest(points, lambda p: (abs(p.number - rule.trial), p.number)))
    if rule.max_size_mb is not None:
        limit = rule.max_size_mb * 1e6
        i = best_eer_with_size_at_most(points, limit)
        if i is None:
            raise NoTrialMeetsRule(f"no trial has size <= {rule.max_size_mb:g} MB ({int(limit):,} bytes)."
                                   + _closest(points, lambda p: (p.size_bytes, p.eer, p.number)))
        return points[i]
    if rule.max_eer is not None:
        i = smallest_with_eer_at_most(points, rule.max_eer)
        if i is None:
            raise NoTrialMeetsRule(f"no trial has EER <= {rule.max_eer:g} %."
                                   + _closest(points, lambda p: (p.eer, p.size_bytes, p.number)))
        return points[i]
    i = knee_point(points)
    assert i is not None  # points is not empty
    return points[i]


# -- checks ---------------------------------------------------------------------------------------------
def packed_file_sizes(path: str | os.PathLike[str]) -> tuple[int, int]:
    """``(file bytes, header bytes)`` of a safetensors file: the header is an 8-byte length plus its JSON."""
    path = Path(path)
    total = path.stat().st_size
    with path.open("rb") as f:
        raw = f.read(8)
    if len(raw) != 8:
        raise ExportMismatch(f"{path} is too short ({total} bytes) to be a safetensors file")
    (header_len,) = struct.unpack("<Q", raw)
    if header_len > total - 8:
        raise ExportMismatch(f"{path}: header length {header_len} exceeds the file ({total} bytes)")
    return total, 8 + header_len


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


def _reevaluate(config: StudyConfig, model: nn.Module) -> tuple[EvalResult, int]:
    """EER of ``model`` on the study's trial subset, computed as a search worker computes it."""
    from lsv_core.evaluate import evaluate
    from lsv_core.workbench import DataPaths, Workbench

    train, eval_dir, trials = config.data_paths()
    bench = Workbench.load(config.model.checkpoint, DataPaths(train, eval_dir, trials),
                           cache_dir=config.data.cache_dir, max_trials=config.data.max_trials,
                           seed=config.data.subset_seed, device="cpu", progress=False, arch=config.model.arch,
                           arch_kwargs=config.model.arch_kwargs)
    threads = torch.get_num_threads()
    # The workers ran with resources.cpu threads; the same count keeps float reductions in the same order.
    torch.set_num_threads(max(1, int(config.resources.cpu)))
    try:
        result = evaluate(model, bench.eval_store, bench.trials, n_boot=TRIAL_N_BOOT, seed=config.study.seed)
    finally:
        torch.set_num_threads(threads)
    return result, len(bench.trials)


# -- MLflow ---------------------------------------------------------------------------------------------
def _trial_run(tracker: StudyTracker, number: int) -> Run | None:
    from search.tracking import TRIAL_TAG

    runs = [r for r in tracker.child_runs() if r.data.tags.get(TRIAL_TAG) == str(number)]
    return runs[-1] if runs else None


def _packed_source(point: TrialPoint, run: Run | None, tracker: StudyTracker | None, scratch: Path) -> Path:
    """The trial's packed file: where the worker wrote it, else the copy logged with its MLflow run."""
    if point.packed_path and Path(point.packed_path).is_file():
        return Path(point.packed_path)
    if run is not None and tracker is not None:
        try:
            local = tracker.client.download_artifacts(run.info.run_id, PACKED_NAME, str(scratch))
            return Path(local)
        except Exception as err:  # MLflow raises several types for a missing artifact
            raise ExportMismatch(f"trial {point.number}: packed file {point.packed_path!r} is gone and its MLflow "
                                 f"run {run.info.run_id} has no {PACKED_NAME} artifact ({err})") from None
    raise ExportMismatch(f"trial {point.number}: packed file {point.packed_path!r} does not exist and no MLflow "
                         "run holds a copy")


def _register(tracker: StudyTracker, run: Run, bundle: Path, name: str, alias: str,
              tags: dict[str, str], description: str) -> str:
    from mlflow.exceptions import MlflowException

    client = tracker.client
    client.log_artifacts(run.info.run_id, str(bundle), "export")
    try:
        client.create_registered_model(name, tags={"lsv.study": tracker.study_name},
                                       description=f"Quantized speaker-embedding models of study {tracker.study_name}")
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    source = f"{run.info.artifact_uri.rstrip('/')}/export"
    version = client.create_model_version(name, source, run_id=run.info.run_id, tags=tags, description=description)
    client.set_registered_model_alias(name, alias, version.version)
    return str(version.version)


# -- export ---------------------------------------------------------------------------------------------
def export_model(config: StudyConfig, rule: SelectionRule, out_dir: str | os.PathLike[str], *,
                 force: bool = False, register: bool = True, eer_tolerance: float = EER_TOLERANCE,
                 alias: str = DEFAULT_ALIAS, model_name: str | None = None) -> ExportResult:
    """Pick a trial by ``rule``, verify it, write the bundle into ``out_dir`` and register it (module docstring).

    Raises:
        RefuseOverwrite: ``out_dir`` exists and ``force`` is False (checked first and again at the end).
        NoTrialMeetsRule: no complete trial satisfies ``rule``.
        ExportMismatch: the packed file or the re-evaluation disagrees with the study's record.
        ConfigError: the study was never run, or the trial has no MLflow run to register.
    """
    from lsv_core import __version__
    from lsv_core.export.card import LayerRow, ModelCard, render_model_card
    from lsv_core.export.onnx_export import check_onnx, export_onnx
    from lsv_core.export.packed import load_packed
    from lsv_core.export.wespeaker import (
        WESPEAKER_FILENAME,
        check_wespeaker_state_dict,
        dequantized_model,
        save_wespeaker_state_dict,
    )
    from lsv_core.quant import BitRecipe, latent_weight, packed_size_bytes, quantizable_layers, recipe_of
    from lsv_core.workbench import recipe_avg_bits
    from search.study import open_study
    from search.tracking import StudyTracker, bits_param

    out = Path(out_dir)
    if out.exists() and not force:
        raise RefuseOverwrite(f"{out} exists; pass --force to replace it")
    if not eer_tolerance >= 0:
        raise ConfigError(f"eer_tolerance={eer_tolerance!r} should be >= 0 (EER points)")
    study_json = config.study_dir / "study.json"
    if not study_json.exists():
        raise ConfigError(f"study {config.study.name!r} has not been run yet (no {study_json})")
    notes: list[str] = []
    made_with = json.loads(study_json.read_text()).get("digest")
    if made_with != config.digest():
        # Not a refusal: a new config field with a default changes the digest too. The re-evaluation
        # below is the real check that the data and the model still give the logged result.
        notes.append(f"{study_json} was made with config digest {made_with}, this config has {config.digest()}")

    study = open_study(config, create=False)
    points = load_points(study)
    chosen = select_trial(points, rule)
    source = chosen
    if chosen.memoized_from is not None:  # a repeat of an earlier trial: its files are the earlier one's
        source = next((p for p in points if p.number == chosen.memoized_from), chosen)

    tracker = StudyTracker(config.mlflow_uri, config.study.name, artifact_root=config.study_dir / "mlartifacts")
    run = _trial_run(tracker, source.number)
    if register and run is None:
        raise ConfigError(f"trial {source.number} has no MLflow run in {config.mlflow_uri}; cannot register it "
                          "(pass register=False / --no-register to export without the registry)")

    recipe = BitRecipe.from_mapping(dict(chosen.recipe))
    with tempfile.TemporaryDirectory(prefix="lsv-export-") as scratch:
        packed_src = _packed_source(source, run, tracker, Path(scratch))
        file_bytes, header_bytes = packed_file_sizes(packed_src)
        if file_bytes - header_bytes != chosen.size_bytes:
            raise ExportMismatch(
                f"trial {chosen.number}: {packed_src} holds {file_bytes - header_bytes:,} bytes of tensors "
                f"({file_bytes:,} - {header_bytes:,} header), the study logged size_bytes={chosen.size_bytes:,}")
        model = load_packed(packed_src)
        if recipe_of(model) != recipe:
            raise ExportMismatch(f"trial {chosen.number}: {packed_src} holds recipe {recipe_of(model).to_dict()}, "
                                 f"the study logged {recipe.to_dict()}")
        if packed_size_bytes(model) != chosen.size_bytes:
            raise ExportMismatch(f"trial {chosen.number}: the loaded model packs to {packed_size_bytes(model):,} "
                                 f"bytes, the study logged {chosen.size_bytes:,}")
        reeval, n_eval = _reevaluate(config, model)
        if not abs(reeval.eer - chosen.eer) <= eer_tolerance:
            raise ExportMismatch(
                f"trial {chosen.number}: re-evaluating {packed_src} gives EER {reeval.eer:.4f} %, the study logged "
                f"{chosen.eer:.4f} % (tolerance {eer_tolerance:g} points); the model or the evaluation data changed"
                + "".join(f"; note: {n}" for n in notes))

        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
        tmp.chmod(0o755)
        try:
            # 1. packed copy, checked by loading it back: same recipe, same outputs bit for bit.
            shutil.copyfile(packed_src, tmp / PACKED_NAME)
            again = load_packed(tmp / PACKED_NAME)
            probe = torch.randn(2, 200, int(model.arch["kwargs"].get("feat_dim", 80)),
                                generator=torch.Generator().manual_seed(0))
            with torch.no_grad():
                want = model(probe)
                if recipe_of(again) != recipe or not torch.equal(again(probe), want):
                    raise ExportMismatch(f"{tmp / PACKED_NAME}: the copy does not load back to the same model")
            # 2. the float network with the dequantized weights: the reference for the other formats.
            plain = dequantized_model(model)
            with torch.no_grad():
                gap = float((plain(probe) - want).abs().max())
            if not gap <= 1e-5:
                raise ExportMismatch(f"the dequantized network differs from the packed model by {gap:.3g}")
            save_wespeaker_state_dict(model, tmp / WESPEAKER_FILENAME)
            check_wespeaker_state_dict(tmp / WESPEAKER_FILENAME, plain)

            commit, dirty = _git_commit()
            model_name = model_name or f"lsv-{config.study.name}"
            provenance: dict[str, Any] = {
                "study": config.study.name,
                "study_dir": str(config.study_dir),
                "optuna_storage": config.optuna_url,
                "optuna_trial": chosen.number,
                "memoized_from": chosen.memoized_from,
                "selection_rule": rule.describe(),
                "config_digest": made_with,
                "export_config_digest": config.digest(),
                "recipe_digest": recipe.digest(),
                "baseline_checkpoint": str(config.model.checkpoint.resolve()),
                "mlflow_tracking_uri": config.mlflow_uri,
                "mlflow_run_id": run.info.run_id if run is not None else None,
                "ray_trial_id": study.trials[source.number].user_attrs.get("ray_trial_id"),
                "registered_model": f"{model_name}@{alias}" if register else None,
                "lsv_version": __version__,
                "git_commit": commit,
                "git_dirty": dirty,
                "exported_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            }
            metrics = {
                "eer": chosen.eer, "eer_ci_low": chosen.eer_ci_low, "eer_ci_high": chosen.eer_ci_high,
                "min_dcf_001": chosen.min_dcf, "eer_reevaluated": reeval.eer,
                "min_dcf_001_reevaluated": reeval.min_dcf_001, "n_eval_trials": n_eval,
                "size_bytes": chosen.size_bytes, "file_bytes": file_bytes,
                "compression_ratio": chosen.compression_ratio, "avg_bits": recipe_avg_bits(model, recipe),
            }
            # 3. ONNX of the float network, run in onnxruntime at two lengths.
            onnx_meta = {"lsv.arch": json.dumps(model.arch, sort_keys=True), "lsv.recipe": recipe.to_json(),
                         **{f"lsv.{k}": str(v) for k, v in provenance.items() if v is not None}}
            export_onnx(plain, tmp / "model.onnx", metadata=onnx_meta)
            onnx_diff = check_onnx(tmp / "model.onnx", plain, lengths=(200, 317))

            (tmp / "recipe.json").write_text(json.dumps(
                {**json.loads(recipe.to_json()), "provenance": provenance, "metrics": metrics}, indent=2) + "\n")
            modules = dict(model.named_modules())
            rows = [LayerRow(name, tuple(latent_weight(modules[name]).shape),
                             bits_param(recipe.get(name)) if name in recipe else "fp32")
                    for name in quantizable_layers(model)]
            fp32 = int(study.user_attrs.get("fp32_bytes") or 0) or round(chosen.size_bytes * (chosen.compression_ratio or 1))
            card = ModelCard(
                title=f"{config.study.name}, trial {chosen.number}: {model.arch['name']} at "
                      f"{metrics['avg_bits']:.2f} bits/weight",
                arch=model.arch, eer=chosen.eer, eer_ci_low=chosen.eer_ci_low, eer_ci_high=chosen.eer_ci_high,
                min_dcf_001=chosen.min_dcf, reeval_eer=reeval.eer, reeval_min_dcf_001=reeval.min_dcf_001,
                eer_tolerance=eer_tolerance, n_eval_trials=n_eval, size_bytes=chosen.size_bytes,
                file_bytes=file_bytes, fp32_bytes=fp32, avg_bits=metrics["avg_bits"], layers=rows,
                provenance=provenance, how_found=_how_found(config, study, chosen, rule, len(points)),
                files={
                    "recipe.json": "bit widths per layer (`BitRecipe.load` / `lsv quantize --recipe` read it), "
                                   "provenance, metrics",
                    PACKED_NAME: "the packed model: bit-packed codebook indices + codebooks (`load_packed`)",
                    WESPEAKER_FILENAME: "dequantized float state dict in WeSpeaker's key layout (`torch.load`)",
                    "model.onnx": "the dequantized float network; input `fbank` (batch, frames, 80), dynamic "
                                  "batch and frames; output `embedding`",
                    "model_card.md": "this card",
                },
                onnx_max_abs_diff=onnx_diff,
            )
            (tmp / "model_card.md").write_text(render_model_card(card))

            for f in tmp.iterdir():
                f.chmod(0o644)  # atomic writes create private temp files; the bundle is meant to be shared
            version = None
            if register:
                assert run is not None
                tags = {"lsv.study": config.study.name, "lsv.optuna_trial": str(chosen.number),
                        "lsv.config_digest": str(made_with), "lsv.recipe_digest": recipe.digest(),
                        "lsv.version": __version__, "lsv.git_commit": commit, "eer": f"{chosen.eer:.4f}",
                        "size_bytes": str(chosen.size_bytes)}
                version = _register(tracker, run, tmp, model_name, alias, tags,
                                    f"trial {chosen.number}: EER {chosen.eer:.2f} %, {chosen.size_bytes:,} bytes "
                                    f"({rule.describe()})")
            _move_into_place(tmp, out, force)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)

    files = {p.name: out / p.name for p in sorted(out.iterdir())}
    return ExportResult(out_dir=out, trial=chosen.number, source_trial=source.number, eer_logged=chosen.eer,
                        eer_reevaluated=reeval.eer, size_bytes=chosen.size_bytes, file_bytes=file_bytes,
                        onnx_max_abs_diff=onnx_diff, files=files, run_id=run.info.run_id if run else None,
                        registered_model=model_name if register else None, model_version=version,
                        alias=alias if register else None, notes=notes)


def _how_found(config: StudyConfig, study: Any, chosen: TrialPoint, rule: SelectionRule, n_complete: int) -> list[str]:
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
        f"Selected by the rule: {rule.describe()}; objectives minimised together: EER and packed bytes"
        + (f" (size budget {config.size_budget_bytes:,} bytes)" if config.size_budget_bytes else "") + ".",
    ]


def _move_into_place(tmp: Path, out: Path, force: bool) -> None:
    """Rename the finished folder onto ``out``; an existing ``out`` is replaced only with ``force``."""
    old = None
    if out.exists():
        if not force:
            raise RefuseOverwrite(f"{out} appeared while exporting; pass --force to replace it")
        old = out.with_name(f".{out.name}.old-{os.getpid()}-{time.monotonic_ns()}")
        os.replace(out, old)
    os.replace(tmp, out)
    if old is None:
        return
    if old.is_dir():
        shutil.rmtree(old, ignore_errors=True)
    else:
        old.unlink()
