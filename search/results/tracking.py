"""MLflow side of a study: one experiment per study, one parent run, one nested child run per Optuna trial.

Only the driver process logs, from one background thread (:class:`TrackingThread`), so SQLite stays
single-writer and the driver does not wait on MLflow between trials; for a cluster point ``tracking_uri``
at an ``mlflow server``. Every call goes through an explicit :class:`mlflow.MlflowClient`: no global tracking
URI and no active run, because one process may track several studies and tests create many stores.

Layout of a study in MLflow::

    experiment "lsv/<study>"             tag mlflow.experimentKind=custom_model_development
      run "<study>"   lsv.role=study     params: the few config fields users filter on (the full config is the
                                         config.json artifact); metrics: baseline_*, summary, and histories
                                         with one step per finished trial (hypervolume, front_size, ...)
        run "0000 7.24% 34.5kB 4 bit; layer3 2 bit; ..."   (number first: names sort; search.results.describe)
        run "0001 ..."    lsv.role=trial params bits.<layer> ("4", "1s", "1a"), avg_bits;
                                         metrics eer (percent), min_dcf, size_bytes, size_mb, stage_eer[step]...;
                                         tags lsv.optuna_trial, lsv.state, lsv.reason, ...; recipe.json;
                                         a description in words (mlflow.note.content)

Logging is idempotent per Optuna trial number, so a resumed study adds no duplicate runs. Each trial
costs about three store calls (create run with its tags, one ``log_batch``, terminate) plus local file
copies for the artifacts: SQLite MLflow calls take tens of milliseconds each.
"""

from __future__ import annotations

import json
import logging
import math
import queue
import re
import shutil
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import mlflow
from mlflow.entities import Metric, Param, Run, RunStatus, RunTag, ViewType
from mlflow.exceptions import MlflowException
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NOTE

from lsv_core.errors import ConfigError
from lsv_core.quant.recipe import BitRecipe, LayerSpec, SpecLike
from search.redaction import redacted, scrub
from search.results.describe import run_name, trial_description
from search.schema_race import open_racing, sqlite_file

__all__ = ["EXPORTED_TAG", "FLOAT_PARAM", "TRIAL_STATES", "StudyTracker", "TrackingThread", "TrialRecord", "bits_param",
           "default_tracking_uri"]

log = logging.getLogger(__name__)

TRIAL_STATES: tuple[str, ...] = ("complete", "pruned", "failed")
EXPERIMENT_PREFIX = "lsv/"
# The MLflow 3 UI opens new experiments in its GenAI view; this tag asks for the model-training one.
EXPERIMENT_KIND_TAG = ("mlflow.experimentKind", "custom_model_development")

ROLE_TAG = "lsv.role"
TRIAL_TAG = "lsv.optuna_trial"
FLOAT_PARAM = "32"  # bits.<layer> of a layer left in float
CONTROL_DELTA_METRICS = ("eer_delta_control", "eer_delta_control_low", "eer_delta_control_high")
# Filterable tags users can trust (README, "Browse"): the control run and the exported (chosen) trial run.
CONTROL_TAG = "control"
EXPORTED_TAG = "exported"

# MLflow's limits (mlflow.utils.validation); a store rejects the whole batch when one entry breaks them.
_MAX_KEY = 250
_MAX_PARAM_VALUE = 6000
_MAX_TAG_VALUE = 8000
_MAX_PARAMS_PER_CALL = 100
_MAX_TAGS_PER_CALL = 100
_MAX_ENTITIES_PER_CALL = 1000
_SEARCH_PAGE = 1000
_BAD_KEY_CHARS = re.compile(r"[^A-Za-z0-9_\-. :/]")


@dataclass
class TrialRecord:
    """What the driver knows about one finished Optuna trial. EERs are in percent."""

    number: int
    state: str
    recipe: Mapping[str, SpecLike]
    reason: str | None = None
    ray_trial_id: str | None = None
    config_hash: str | None = None
    avg_bits: float | None = None
    eer: float | None = None
    eer_ci_low: float | None = None
    eer_ci_high: float | None = None
    min_dcf: float | None = None
    size_bytes: int | None = None
    compression_ratio: float | None = None
    stage_eers: list[float] = field(default_factory=list)
    wall_s: float | None = None
    memoized_from: int | None = None
    artifacts: dict[str, str] = field(default_factory=dict)
    cost: dict[str, float] = field(default_factory=dict)  # fte, finetune_samples, wall_s, cpu_s, ... (metrics cost_*)
    # EER on the study's shared bootstrap replicates (not logged) and, once the fp32 control is known, the
    # paired difference to it: (delta, low, high) in EER points (metrics eer_delta_control[_low|_high]).
    eer_boot: tuple[float, ...] | None = field(default=None, repr=False)
    control_delta: tuple[float, float, float] | None = None

    def __post_init__(self) -> None:
        if self.state not in TRIAL_STATES:
            raise ValueError(
                f"TrialRecord.state={self.state!r} is not allowed; expected one of {TRIAL_STATES}"
            )
        if isinstance(self.number, bool) or not isinstance(self.number, int) or self.number < 0:
            raise ValueError(
                f"TrialRecord.number={self.number!r} should be an Optuna trial number (int >= 0)"
            )


def bits_param(spec: SpecLike) -> str:
    """The MLflow param value for one layer: its :attr:`LayerSpec.token` (``"4"``, ``"1s"``, ``"1a"``).

    A bare ``1`` means adaptive (the recipe default); ``None`` / ``"float"`` gives :data:`FLOAT_PARAM`.
    """
    parsed = LayerSpec.parse(spec)
    return FLOAT_PARAM if parsed is None else parsed.token


def default_tracking_uri(study_dir: str | Path) -> str:
    """``sqlite:///<study_dir>/mlflow.db`` with an absolute path, so it works from any working directory."""
    return f"sqlite:///{Path(study_dir).expanduser().resolve() / 'mlflow.db'}"


class StudyTracker:
    """Logs one study to MLflow through an explicit client; see the module docstring for the layout.

    ``artifact_root`` is the folder where the experiment's artifacts go; by default the ``mlartifacts``
    folder beside a SQLite database, and the server's default for other stores. It applies only when
    this tracker creates the experiment: an existing experiment keeps its artifact location.
    """

    def __init__(self, tracking_uri: str, study_name: str, *, artifact_root: Path | None = None) -> None:
        if not isinstance(study_name, str) or not study_name.strip():
            raise ConfigError(f"study_name={study_name!r} should be a non-empty string")
        self.tracking_uri = tracking_uri
        self.study_name = study_name
        self.experiment_name = EXPERIMENT_PREFIX + study_name
        if artifact_root is None:
            db = sqlite_file(tracking_uri)
            artifact_root = db.expanduser().resolve().parent / "mlartifacts" if db is not None else None
        self.artifact_root = Path(artifact_root).expanduser().resolve() if artifact_root is not None else None
        self.client = _open_client(tracking_uri)
        self.experiment_id = self._get_or_create_experiment()
        self._parent_run_id: str | None = None
        self._logged: set[int] | None = None
        # Child runs left RUNNING by a driver that died mid-log: replaced when that trial is logged again.
        self._interrupted: dict[int, list[str]] = {}

    @classmethod
    def for_study_dir(cls, study_dir: str | Path, study_name: str) -> StudyTracker:
        """A tracker on ``<study_dir>/mlflow.db`` with artifacts in ``<study_dir>/mlartifacts``."""
        study_dir = Path(study_dir).expanduser().resolve()
        study_dir.mkdir(parents=True, exist_ok=True)
        return cls(default_tracking_uri(study_dir), study_name, artifact_root=study_dir / "mlartifacts")

    # -- the study (parent run) --------------------------------------------------------------------
    def start_study(self, config: Mapping[str, Any], config_hash: str, baseline: Mapping[str, float], *,
                    param_keys: Sequence[str] | None = None) -> str:
        """Create the study's parent run, or reopen it when the study resumes; returns its run id.

        Logs the flattened config as params (only the dotted ``param_keys`` when given: every param is a
        column of the runs table, so a study logs the few users filter on; values cut to MLflow's limits;
        the full text is in the ``config.json`` artifact), ``baseline`` as ``baseline_<key>`` metrics, and
        tags ``lsv.study``, ``lsv.config_hash``. Resuming with a different ``config_hash`` raises
        :class:`ConfigError`.
        """
        existing = self._find_parent()
        if existing is None:
            run = self.client.create_run(
                self.experiment_id,
                run_name=self.study_name,
                tags={ROLE_TAG: "study", "lsv.study": self.study_name, "lsv.config_hash": config_hash},
            )
            logged_params: Mapping[str, str] = {}
            logged_metrics: Mapping[str, float] = {}
        else:
            run = existing
            old_hash = run.data.tags.get("lsv.config_hash")
            if old_hash is not None and old_hash != config_hash:
                raise ConfigError(
                    f"study {self.study_name!r} in {redacted(self.tracking_uri)} was started with config_hash={old_hash!r}; "
                    f"cannot resume it with config_hash={config_hash!r} (start a new study name instead)"
                )
            logged_params, logged_metrics = run.data.params, run.data.metrics
            if run.info.status != "RUNNING":
                self.client.update_run(run.info.run_id, status="RUNNING")
        run_id = run.info.run_id
        self._parent_run_id = run_id

        # On resume only what is missing is logged (a driver may have died between create and log).
        now = _now_ms()
        wanted = None if param_keys is None else {_param_key(k) for k in param_keys}
        params = [
            Param(key, value) for key, value in _config_params(config).items()
            if key not in logged_params and (wanted is None or key in wanted)
        ]
        metrics = [
            Metric(_metric_key(key, prefix="baseline_"), float(value), now, 0)
            for key, value in baseline.items()
            if _metric_key(key, prefix="baseline_") not in logged_metrics
        ]
        self._log_batch(run_id, metrics=metrics, params=params)
        if existing is None or not logged_params:
            self.client.log_text(
                run_id, json.dumps(config, indent=2, sort_keys=True, default=str), "config.json"
            )
        return run_id

    @property
    def parent_run_id(self) -> str:
        """The study's parent run id (found in the store when this tracker did not call start_study)."""
        if self._parent_run_id is None:
            parent = self._find_parent()
            if parent is None:
                raise RuntimeError(
                    f"study {self.study_name!r} has no parent run in {redacted(self.tracking_uri)}; call start_study() first"
                )
            self._parent_run_id = parent.info.run_id
        return self._parent_run_id

    def finish_study(self, summary: Mapping[str, float]) -> None:
        """Log ``summary`` metrics on the parent run and mark it FINISHED (start_study reopens it)."""
        now = _now_ms()
        metrics = [Metric(_metric_key(key), float(value), now, 0) for key, value in summary.items()]
        self._log_batch(self.parent_run_id, metrics=metrics)
        self.client.set_terminated(self.parent_run_id, status="FINISHED", end_time=now)

    def log_progress(self, step: int, metrics: Mapping[str, float | None]) -> None:
        """One point of the parent run's metric histories (e.g. ``hypervolume``, ``front_size``) at ``step``
        (the number of finished trials), so MLflow's chart view draws the search's progress. None values
        and non-finite ones are skipped."""
        now = _now_ms()
        entries = [Metric(_metric_key(k), float(v), now, int(step)) for k, v in metrics.items()
                   if v is not None and _finite(float(v))]
        self._log_batch(self.parent_run_id, metrics=entries)

    def log_study_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Attach a file or folder (e.g. a Pareto plot, the study report) to the parent run."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"study artifact {str(path)!r} does not exist")
        if path.is_dir():
            self.client.log_artifacts(self.parent_run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(self.parent_run_id, str(path), artifact_path)

    # -- trials (child runs) -----------------------------------------------------------------------
    def log_trial(self, record: TrialRecord) -> str | None:
        """Log one Optuna trial as a nested child run and return its run id.

        Returns None and logs nothing when this trial number is already in the store (a resumed study).
        ``record.artifacts`` maps the artifact's path inside the run (e.g. ``"model.lsvq"``) to a local
        file or folder; everything is checked before the run is created, so a bad record leaves no run.
        """
        logged = self._logged_set()
        if record.number in logged:
            return None
        recipe = BitRecipe(record.recipe)  # validates the specs; its JSON is what BitRecipe.load reads
        artifacts = _check_artifacts(record.artifacts)
        parent = self.parent_run_id
        for stale in self._interrupted.pop(record.number, []):
            self.client.delete_run(stale)

        end = _now_ms()
        start = end - int(record.wall_s * 1000) if _finite(record.wall_s) and record.wall_s >= 0 else end
        tags = {
            MLFLOW_PARENT_RUN_ID: parent,
            ROLE_TAG: "trial",
            "lsv.study": self.study_name,
            TRIAL_TAG: str(record.number),
            "lsv.state": record.state,
            MLFLOW_RUN_NOTE: _cut(trial_description(
                record.recipe, state=record.state, eer=record.eer, size_bytes=record.size_bytes,
                compression_ratio=record.compression_ratio, reason=record.reason,
                memoized_from=record.memoized_from), _MAX_TAG_VALUE),
        }
        optional = {
            "lsv.reason": record.reason,
            "lsv.ray_trial_id": record.ray_trial_id,
            "lsv.config_hash": record.config_hash,
            "lsv.memoized_from": record.memoized_from,
        }
        tags.update(
            {key: _cut(str(value), _MAX_TAG_VALUE) for key, value in optional.items() if value is not None}
        )
        run_id = self.client.create_run(
            self.experiment_id, start_time=start, tags=tags, run_name=run_name(
                record.number, record.recipe, state=record.state, eer=record.eer, size_bytes=record.size_bytes)
        ).info.run_id

        params = [Param(_param_key(f"bits.{layer}"), bits_param(spec)) for layer, spec in recipe.items()]
        if record.avg_bits is not None:
            params.append(Param("avg_bits", f"{record.avg_bits:g}"))
        self._log_batch(run_id, metrics=_trial_metrics(record, end), params=params)
        self.client.log_text(
            run_id, json.dumps(json.loads(recipe.to_json()), indent=2, sort_keys=True), "recipe.json"
        )
        for name, path in artifacts.items():
            self._log_artifact_as(run_id, path, name)
        status = RunStatus.to_string(RunStatus.FAILED if record.state == "failed" else RunStatus.FINISHED)
        self.client.set_terminated(run_id, status=status, end_time=end)
        logged.add(record.number)
        return run_id

    def logged_trials(self) -> set[int]:
        """Optuna trial numbers already logged (a copy; cached after one search of the store)."""
        return set(self._logged_set())

    def child_runs(self) -> list[Run]:
        """All trial runs of this study, ordered by Optuna trial number."""
        runs = self._search(f"tags.\"{ROLE_TAG}\" = 'trial'")
        return sorted(runs, key=lambda run: int(run.data.tags.get(TRIAL_TAG, "-1")))

    def set_tags(self, run_id: str, tags: Mapping[str, Any]) -> None:
        """Set (or overwrite) tags on a run, e.g. ``{"lsv.pareto": "true"}`` on the Pareto front."""
        entries = [RunTag(_param_key(key), _cut(str(value), _MAX_TAG_VALUE)) for key, value in tags.items()]
        self._log_batch(run_id, tags=entries)

    def log_side_run(self, role: str, name: str, metrics: Mapping[str, float], *, tags: Mapping[str, str] | None = None,
                     parent_run_id: str | None = None, key: str | None = None) -> str:
        """A run beside the trials (``role`` "control" or "verification"), nested under ``parent_run_id``
        (default: the study's run). Idempotent per ``key`` (tag ``lsv.key``): logging it again returns the
        existing run."""
        if key is not None:
            found = self._search(f"tags.\"{ROLE_TAG}\" = '{role}' and tags.\"lsv.key\" = '{key}'")
            if found:
                return found[0].info.run_id
        all_tags = {MLFLOW_PARENT_RUN_ID: parent_run_id or self.parent_run_id, ROLE_TAG: role,
                    "lsv.study": self.study_name, **({"lsv.key": key} if key else {}), **dict(tags or {})}
        run_id = self.client.create_run(self.experiment_id, tags=all_tags, run_name=name).info.run_id
        now = _now_ms()
        self._log_batch(run_id, metrics=[Metric(_metric_key(k), float(v), now, 0) for k, v in metrics.items()
                                         if v is not None and _finite(float(v))])
        self.client.set_terminated(run_id, status="FINISHED", end_time=now)
        return run_id

    def log_metrics(self, run_id: str, metrics: Mapping[str, float]) -> None:
        """Add (or overwrite) metrics of an existing run, e.g. a trial's difference to the control."""
        now = _now_ms()
        self._log_batch(run_id, metrics=[Metric(_metric_key(k), float(v), now, 0) for k, v in metrics.items()])

    def trial_run(self, number: int) -> Run | None:
        """The (last) child run of Optuna trial ``number``, or None."""
        runs = [r for r in self.child_runs() if r.data.tags.get(TRIAL_TAG) == str(number)]
        return runs[-1] if runs else None

    def register_bundle(self, run_id: str, bundle: Path, name: str, alias: str, tags: Mapping[str, str],
                        description: str) -> str:
        """Log ``bundle`` under ``export/`` of run ``run_id`` and register it as a new version of the
        registered model ``name`` (created when missing), with ``alias`` pointing at it; returns the version."""
        self.client.log_artifacts(run_id, str(bundle), "export")
        try:
            self.client.create_registered_model(
                name, tags={"lsv.study": self.study_name},
                description=f"Quantized speaker-embedding models of study {self.study_name}")
        except MlflowException as err:
            if err.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        source = f"{self.client.get_run(run_id).info.artifact_uri.rstrip('/')}/export"
        version = self.client.create_model_version(name, source, run_id=run_id, tags=dict(tags),
                                                   description=description)
        self.client.set_registered_model_alias(name, alias, version.version)
        # `tags.exported = "true"` finds the chosen trials in the runs table; the value says where each went.
        self.set_tags(run_id, {EXPORTED_TAG: "true", "exported_as": f"{name} v{version.version} @{alias}"})
        return str(version.version)

    def runs_url(self, host: str = "127.0.0.1", port: int = 5000) -> str:
        """Link to the experiment's runs table in ``mlflow ui`` / ``mlflow server`` (not its GenAI overview)."""
        return f"http://{host}:{port}/#/experiments/{self.experiment_id}/runs"

    def front_url(self, base: str = "http://127.0.0.1:5000", tag: str = "pareto_optimal") -> str:
        """Link to the runs table filtered to the runs tagged ``tag = "true"`` (the Pareto front by default),
        smallest model first. Any order but the creation date also shows the trial runs flat: the UI nests
        child runs under their parent (collapsed) only when sorted by date."""
        query = urllib.parse.urlencode({"searchFilter": f'tags.{tag} = "true"', "orderByKey": "metrics.`size_bytes`",
                                        "orderByAsc": "true"}, quote_via=urllib.parse.quote)
        return f"{base.rstrip('/')}/#/experiments/{self.experiment_id}/runs?{query}"

    # -- internals ---------------------------------------------------------------------------------
    def _get_or_create_experiment(self) -> str:
        try:
            experiment = self.client.get_experiment_by_name(self.experiment_name)
        except Exception as err:  # the first store access: any failure means a bad URI
            raise ConfigError(
                f"tracking_uri={redacted(self.tracking_uri)!r}: cannot open the MLflow tracking store "
                f"({type(err).__name__}: {_first_line(err)})"
            ) from err
        if experiment is None:
            location = self.artifact_root.as_uri() if self.artifact_root is not None else None
            try:
                return self.client.create_experiment(
                    self.experiment_name, artifact_location=location, tags=dict([EXPERIMENT_KIND_TAG])
                )
            except MlflowException as err:
                if err.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
                experiment = self.client.get_experiment_by_name(self.experiment_name)  # another driver won
                assert experiment is not None
        if experiment.lifecycle_stage != "active":
            raise ConfigError(
                f"MLflow experiment {self.experiment_name!r} in {redacted(self.tracking_uri)} is deleted; restore it "
                f"(mlflow experiments restore --experiment-id {experiment.experiment_id}) or purge it (mlflow gc)"
            )
        return experiment.experiment_id

    def _find_parent(self) -> Run | None:
        runs = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.\"{ROLE_TAG}\" = 'study'",
            order_by=["attributes.start_time ASC"],
            max_results=1,
        )
        return runs[0] if runs else None

    def _logged_set(self) -> set[int]:
        if self._logged is None:
            logged: set[int] = set()
            for run in self._search(f"tags.\"{ROLE_TAG}\" = 'trial'"):
                number = int(run.data.tags[TRIAL_TAG])
                if run.info.status == "RUNNING":
                    self._interrupted.setdefault(number, []).append(run.info.run_id)
                else:
                    logged.add(number)
            self._logged = logged
        return self._logged

    def _search(self, filter_string: str) -> list[Run]:
        runs: list[Run] = []
        token: str | None = None
        while True:
            page = self.client.search_runs(
                [self.experiment_id],
                filter_string=filter_string,
                run_view_type=ViewType.ACTIVE_ONLY,
                max_results=_SEARCH_PAGE,
                page_token=token,
            )
            runs.extend(page)
            token = page.token
            if not token:
                return runs

    def _log_batch(
        self,
        run_id: str,
        *,
        metrics: Sequence[Metric] = (),
        params: Sequence[Param] = (),
        tags: Sequence[RunTag] = (),
    ) -> None:
        for m, p, t in _batches(metrics, params, tags):
            self.client.log_batch(run_id, metrics=m, params=p, tags=t)

    def _log_artifact_as(self, run_id: str, path: Path, name: str) -> None:
        target = PurePosixPath(name)
        folder = str(target.parent) if str(target.parent) != "." else None
        if path.is_dir():
            self.client.log_artifacts(run_id, str(path), name)
        elif path.name == target.name:
            self.client.log_artifact(run_id, str(path), folder)
        else:  # MLflow keeps the local file name: copy it under the requested one
            with tempfile.TemporaryDirectory(prefix="lsv-artifact-") as tmp:
                renamed = Path(tmp) / target.name
                shutil.copyfile(path, renamed)
                self.client.log_artifact(run_id, str(renamed), folder)


class TrackingThread:
    """Runs tracking calls on one background thread, in the order they were submitted.

    The driver hands a finished trial to MLflow and goes straight back to Ray and Optuna, so the next
    trial is not kept waiting on store calls and artifact copies (tens of milliseconds on SQLite, a
    network round trip each on a tracking server). One thread keeps a SQLite store single-writer. A
    failing call is logged and counted, never raised into the study: Optuna holds every result, and
    :meth:`close` reports the failures so the caller can re-log what MLflow lacks.
    """

    def __init__(self, name: str = "lsv-tracking") -> None:
        self._queue: queue.Queue[tuple[Callable[..., Any], tuple[Any, ...]] | None] = queue.Queue()
        self.errors: list[str] = []
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        if not self._thread.is_alive():
            raise RuntimeError("the tracking thread is closed")
        self._queue.put((fn, args))

    def close(self) -> list[str]:
        """Run what is queued, stop the thread and return the errors of failed calls."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        return list(self.errors)

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                fn, args = item
                try:
                    fn(*args)
                except Exception as exc:  # noqa: BLE001 - reported by close(); the study goes on
                    self.errors.append(f"{getattr(fn, '__name__', fn)}: {_first_line(exc)}")
                    log.warning("tracking call %s failed: %s", getattr(fn, "__name__", fn), exc)
            finally:
                self._queue.task_done()



# -- module helpers --------------------------------------------------------------------------------
def _open_client(tracking_uri: str) -> mlflow.MlflowClient:
    if not isinstance(tracking_uri, str) or not tracking_uri:
        raise ConfigError(
            f"tracking_uri={tracking_uri!r} should be a URI such as sqlite:////abs/path/mlflow.db"
        )
    if tracking_uri.startswith(("http://", "https://")):
        _check_server(tracking_uri)
    try:
        return open_racing(lambda: mlflow.MlflowClient(tracking_uri=tracking_uri), tracking_uri)
    except Exception as err:  # MLflow raises various types for unsupported schemes
        raise ConfigError(
            f"tracking_uri={redacted(tracking_uri)!r} is not a usable MLflow tracking URI ({scrub(_first_line(err), tracking_uri)}); "
            "use sqlite:////abs/path/mlflow.db or http://host:port"
        ) from err


def _check_server(tracking_uri: str) -> None:
    # MLflow's HTTP client retries with backoff for minutes; fail fast when nothing listens at all.
    url = tracking_uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=5):
            pass
    except urllib.error.HTTPError:
        pass  # something answers (auth, proxy, old server): let MLflow talk to it
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise ConfigError(
            f"tracking_uri={redacted(tracking_uri)!r}: no MLflow server answers at {redacted(url)} ({reason})"
        ) from err


def _trial_metrics(record: TrialRecord, timestamp: int) -> list[Metric]:
    values: dict[str, float | None] = {
        "eer": record.eer,
        "eer_ci_low": record.eer_ci_low,
        "eer_ci_high": record.eer_ci_high,
        "min_dcf": record.min_dcf,
        "size_bytes": record.size_bytes,
        "size_mb": record.size_bytes / 1e6 if record.size_bytes is not None else None,
        "compression_ratio": record.compression_ratio,
        # Also a metric: the UI sorts and plots metrics numerically, params only as text.
        "avg_bits": record.avg_bits,
        "wall_s": record.wall_s,
    }
    values.update({f"cost_{k}": v for k, v in record.cost.items()})
    if record.control_delta is not None:
        values.update(dict(zip(CONTROL_DELTA_METRICS, record.control_delta, strict=True)))
    # Rounded to what they mean (search.objectives): EER 4 decimals, minDCF 5, bytes as integers.
    from search.objectives import rounded

    metrics = [Metric(key, float(rounded(key, value)), timestamp, 0) for key, value in values.items()
               if value is not None]
    metrics += [
        Metric("stage_eer", float(rounded("eer", eer)), timestamp, step) for step, eer in enumerate(record.stage_eers)
    ]
    return metrics


def _batches(
    metrics: Sequence[Metric], params: Sequence[Param], tags: Sequence[RunTag]
) -> Iterator[tuple[list[Metric], list[Param], list[RunTag]]]:
    """Split into log_batch calls within MLflow's limits (100 params, 100 tags, 1000 entities per call)."""
    metrics, params, tags = list(metrics), list(params), list(tags)
    while metrics or params or tags:
        p, params = params[:_MAX_PARAMS_PER_CALL], params[_MAX_PARAMS_PER_CALL:]
        t, tags = tags[:_MAX_TAGS_PER_CALL], tags[_MAX_TAGS_PER_CALL:]
        room = _MAX_ENTITIES_PER_CALL - len(p) - len(t)
        m, metrics = metrics[:room], metrics[room:]
        yield m, p, t


def _config_params(config: Mapping[str, Any]) -> dict[str, str]:
    return {
        _param_key(key): _cut(_param_text(value), _MAX_PARAM_VALUE) for key, value in _flatten(config).items()
    }


def _flatten(table: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in table.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(_flatten(value, prefix=f"{name}."))
        else:
            out[name] = value
    return out


def _param_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, default=str, sort_keys=True)


def _param_key(key: str) -> str:
    # MLflow keys allow letters, digits and "_-. :/"; anything else would reject the whole batch.
    return _cut(_BAD_KEY_CHARS.sub("_", str(key)), _MAX_KEY)


def _metric_key(key: str, prefix: str = "") -> str:
    key = str(key)
    return _param_key(key if key.startswith(prefix) else prefix + key)


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_artifacts(artifacts: Mapping[str, str | Path]) -> dict[str, Path]:
    checked: dict[str, Path] = {}
    for name, path in artifacts.items():
        parts = PurePosixPath(name).parts
        if not name or PurePosixPath(name).is_absolute() or ".." in parts:
            raise ValueError(
                f"artifact name={name!r} should be a relative path inside the run, e.g. 'model.lsvq'"
            )
        local = Path(path)
        if not local.exists():
            raise FileNotFoundError(f"artifact {name!r}: local file {str(local)!r} does not exist")
        checked[name] = local
    return checked


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _now_ms() -> int:
    return int(time.time() * 1000)
