"""Study configuration: a TOML file in ``studies/``, validated completely before anything starts.

Every invalid field produces one :class:`~lsv_core.errors.ConfigError` that names the field (dotted
path), the value received and what is allowed; ``lsv run`` turns it into exit status 2.
"""

from __future__ import annotations

import hashlib
import json
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo

from lsv_core.data.loader import DataLoading
from lsv_core.data.subset import TrainingSubset
from lsv_core.errors import ConfigError
from lsv_core.quant.codebook import CentroidUpdate, KMQATConfig
from lsv_core.quant.msft import MsftSchedule, Order
from lsv_core.quant.recipe import ALLOWED_BITS, binary_modes
from lsv_core.settings import bounds_of, default_of
from lsv_core.workbench import DataPaths, WorkbenchSpec
from search.redaction import redacted
from search.samplers.names import SAMPLER_NAMES

__all__ = ["StudyConfig", "load_study_config", "parse_study_config"]

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class _Section(BaseModel):
    # strict: "1", true or 1.0 for an integer (or "yes" for a bool) is an error, not a silent coercion.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


# Paths are the one coercion allowed: TOML has no path type, so they come as strings.
PathValue = Annotated[Path, Field(strict=False)]
DEFAULT_CORPUS = Path("data/corpus")
DEFAULT_CHECKPOINT = Path("runs/baseline/model.safetensors")
DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def _library(cls: type, name: str, **extra: Any) -> Any:
    """A field with the default and bounds the library declares for ``cls.name`` (lsv_core.settings)."""
    info: FieldInfo = Field(default=default_of(cls, name), **bounds_of(cls, name), **extra)
    return info


class StudySection(_Section):
    name: str
    out_dir: PathValue = Path("runs")
    seed: int = 0
    n_trials: int | None = Field(default=16, ge=1)
    timeout_s: float | None = Field(default=None, gt=0)
    sampler: str = "tpe"
    concurrency: int = Field(default=2, ge=1)
    # Every this many finished trials `lsv run` redraws the study's plots and front table into its MLflow
    # parent run (search.results.renderers), and again when the study ends or stops; 0: only then.
    report_every: int = Field(default=8, ge=0)

    @field_validator("sampler")
    @classmethod
    def _sampler(cls, v: str) -> str:
        if v not in SAMPLER_NAMES:
            raise ValueError(f"allowed samplers are {sorted(SAMPLER_NAMES)}")
        return v

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME_RE.match(v):
            raise ValueError("must be 1-64 characters of letters, digits, '_', '.', '-', starting with a letter/digit")
        return v

    @model_validator(mode="after")
    def _stop_rule(self) -> StudySection:
        if self.n_trials is None and self.timeout_s is None:
            raise ValueError("give n_trials and/or timeout_s, or the study never ends")
        return self


class ModelSection(_Section):
    """The float baseline: a checkpoint from ``lsv train``, or a WeSpeaker ``avg_model.pt`` with ``arch``.

    ``train_if_missing`` trains the default baseline only at the default path (the quickstart's); any other
    path that does not exist is an error, never a reason to train for minutes.
    """

    checkpoint: PathValue = DEFAULT_CHECKPOINT
    arch: str | None = None  # for a WeSpeaker avg_model.pt, e.g. "ResNet34"
    # or a model factory "package.module:function" for a .pt of any network (lsv_core.models.plugin)
    factory: str | None = None
    arch_kwargs: dict[str, Any] = Field(default_factory=dict)
    train_if_missing: bool = True
    train_steps: int | None = Field(default=None, ge=1)

    @field_validator("factory")
    @classmethod
    def _factory(cls, v: str | None) -> str | None:
        if v is not None:
            from lsv_core.models.plugin import resolve_factory

            try:
                resolve_factory(v, field="value")
            except ConfigError as err:
                raise ValueError(str(err).removeprefix(f"value={v!r}").lstrip(": ")) from None
        return v

    @model_validator(mode="after")
    def _one_architecture(self) -> ModelSection:
        if self.arch is not None and self.factory is not None:
            raise ValueError("give arch (a registered name) or factory (a plugin), not both")
        return self

    @property
    def architecture(self) -> str | None:
        """What rebuilds the network of a ``.pt`` checkpoint: ``arch`` or the ``factory`` reference."""
        return self.factory if self.factory is not None else self.arch


class DataSection(_Section):
    """Either ``corpus`` (the layout of ``lsv corpus synth``) or ``train`` + ``eval`` + ``trials``.

    ``features`` says where training and evaluation features come from (lsv_core.data.loader): ``auto``
    keeps them in memory when they fit ``memory_budget_mb``, else reads them from the sharded store in
    ``cache_dir`` (``lsv data cache`` builds it ahead), else computes them from the audio. ``train_speakers``
    / ``train_utts_per_speaker`` fine-tune on a subset drawn with ``train_subset_seed``
    (lsv_core.data.subset); defaults and bounds are the library's."""

    corpus: PathValue | None = DEFAULT_CORPUS
    # Synthesizes the embedded corpus only at its default path (the quickstart's); a corpus path that was
    # typed and does not exist is an error.
    synthesize_if_missing: bool = True
    train: PathValue | None = None
    eval: PathValue | None = None
    trials: PathValue | None = None
    cache_dir: PathValue = Path("runs/cache")
    max_trials: int | None = Field(default=None, ge=10)
    # Its own seed, not study.seed: studies that differ only in their search seed score on the same trials.
    subset_seed: int = 0
    features: Literal["auto", "memory", "store", "audio"] = _library(DataLoading, "features")
    memory_budget_mb: float = _library(DataLoading, "memory_budget_mb")
    feature_dtype: Literal["float16", "float32"] = _library(DataLoading, "dtype")
    loader_workers: int | None = _library(DataLoading, "loader_workers")
    train_speakers: int | None = _library(TrainingSubset, "speakers")
    train_utts_per_speaker: int | None = _library(TrainingSubset, "utts_per_speaker")
    train_subset_seed: int = _library(TrainingSubset, "seed")

    @model_validator(mode="after")
    def _one_source(self) -> DataSection:
        explicit = (self.train, self.eval, self.trials)
        if any(x is not None for x in explicit):
            if not all(x is not None for x in explicit):
                raise ValueError("give all of train, eval and trials, or only corpus")
        elif self.corpus is None:
            raise ValueError("give corpus, or train + eval + trials")
        return self


_DATA_FIELDS_SINCE_V2 = ("features", "memory_budget_mb", "feature_dtype", "loader_workers", "train_speakers",
                         "train_utts_per_speaker", "train_subset_seed")


class SpaceSection(_Section):
    granularity: Literal["layer", "block", "stage"] = "layer"
    bits: list[int] = Field(default_factory=lambda: list(ALLOWED_BITS))
    binary_modes: list[str] = Field(default_factory=lambda: ["adaptive"])
    tie_shortcuts: bool = True
    fixed: dict[str, int | None] = Field(default_factory=dict)

    @field_validator("bits")
    @classmethod
    def _bits(cls, v: list[int]) -> list[int]:
        bad = [b for b in v if b not in ALLOWED_BITS]
        if bad or not v:
            raise ValueError(f"allowed bit widths are {list(ALLOWED_BITS)} (at least one)")
        if len(set(v)) != len(v):
            raise ValueError("bit widths are listed twice")
        return sorted(v)

    @field_validator("binary_modes")
    @classmethod
    def _modes(cls, v: list[str]) -> list[str]:
        allowed = binary_modes()
        if not v or len(set(v)) != len(v) or any(m not in allowed for m in v):
            raise ValueError(f"list 1-bit modes from {list(allowed)}, each once")
        return v

    @field_validator("fixed")
    @classmethod
    def _fixed(cls, v: dict[str, int | None]) -> dict[str, int | None]:
        bad = {k: b for k, b in v.items() if b is not None and b not in ALLOWED_BITS}
        if bad:
            raise ValueError(f"fixed bits {bad} not allowed; use one of {list(ALLOWED_BITS)} or omit for float")
        return v


class ObjectivesSection(_Section):
    """The two objectives, both minimised: ``accuracy`` (``"eer"``: EER in percent; ``"min_dcf"``: the
    normalised minimum detection cost at ``p_target``, C_miss = C_fa = 1) and the deployable size in bytes,
    at most ``size_budget_mb`` MB. Both EER and minDCF are always measured and logged."""

    size_budget_mb: float | None = Field(default=None, gt=0)
    accuracy: Literal["eer", "min_dcf"] = "eer"
    p_target: float = Field(default=0.01, gt=0, lt=1)

    @model_validator(mode="before")
    @classmethod
    def _old_min_dcf(cls, data: Any) -> Any:
        # Before `accuracy`, a `min_dcf` flag was accepted and did nothing (the EER was the objective).
        if isinstance(data, dict) and "min_dcf" in data:
            data = dict(data)
            if data.pop("min_dcf") is not False:
                raise ValueError("min_dcf = true is no longer a field: choose the accuracy objective with "
                                 "accuracy = \"min_dcf\" (and p_target, default 0.01) or accuracy = \"eer\"")
        return data


class MsftSection(_Section):
    """Multi-stage fine-tuning of each trial (lsv_core.quant.msft; defaults and bounds are the library's
    :class:`MsftSchedule` / :class:`KMQATConfig`). ``order = "sensitivity"`` groups layers by their Hessian
    sensitivity at the trial's bits (computed once per baseline, cached) into ``n_groups`` stages, robust
    layers first; ``stage_eval_frames`` cuts utterances when scoring intermediate stages."""

    order: Order = _library(MsftSchedule, "order")
    total_steps: int = _library(MsftSchedule, "total_steps")
    n_groups: int = _library(MsftSchedule, "n_groups", description="stages for the sensitivity and depth orders")
    lr: float = _library(MsftSchedule, "lr")
    final_lr: float = _library(MsftSchedule, "final_lr", description="learning rate at the last step (exponential decay from lr)")
    batch_size: int = _library(MsftSchedule, "batch_size")
    stage_eval_frames: int | None = _library(MsftSchedule, "stage_eval_frames")
    centroid_update: CentroidUpdate = _library(KMQATConfig, "centroid_update")
    recluster_every: int = _library(KMQATConfig, "recluster_every")


class SeedsSection(_Section):
    uniform: bool = True
    allocator_fractions: list[float] = Field(default_factory=lambda: [0.06, 0.09, 0.12])

    @field_validator("allocator_fractions")
    @classmethod
    def _fractions(cls, v: list[float]) -> list[float]:
        if any(not 0 < f < 1 for f in v):
            raise ValueError("fractions of the fp32 size must lie in (0, 1)")
        return v


class EarlyStopSection(_Section):
    enabled: bool = True
    margin: float = Field(default=1.0, ge=0, description="EER points (percent) a peer must be better by")
    min_peers: int = Field(default=3, ge=1)


class ResourcesSection(_Section):
    """What one trial gets from Ray (``cpu``, ``gpu``: fractions share a GPU), where it runs, and what the
    driver does with a node that fails the preflight (``bad_nodes``: ``"stop"`` the study, or ``"skip"``
    the node). ``device``: ``"auto"`` is the GPU Ray assigned the trial, else the CPU (a trial with ``gpu =
    0`` never touches a GPU, even on a GPU node, and neither do the driver's own steps: probes, Hessian
    traces, baseline training). ``hessian``: where the baseline's Hessian traces (and the
    ``probe`` sampler's unit probes) are computed, on the ``"driver"`` or on a ``"worker"`` (a Ray task with
    one trial's resources)."""

    cpu: float = Field(default=1, gt=0)
    gpu: float = Field(default=0, ge=0)
    max_failures: int = Field(default=1, ge=0)
    device: str = "auto"
    bad_nodes: Literal["stop", "skip"] = "stop"
    hessian: Literal["driver", "worker"] = "driver"

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not DEVICE_RE.match(v):
            raise ValueError("allowed: 'auto', 'cpu', 'cuda', 'cuda:N'")
        if v.startswith("cuda:"):  # Ray isolates GPUs: a trial sees its own as cuda:0, whatever N says
            raise ValueError(f"a trial's GPU is the one Ray assigns it, so {v!r} cannot be honoured; allowed in a "
                             "study: 'auto', 'cpu', 'cuda' (with resources.gpu > 0)")
        return v

    @model_validator(mode="after")
    def _gpu_for_cuda(self) -> ResourcesSection:
        if self.device.startswith("cuda") and self.gpu <= 0:
            raise ValueError(f"device={self.device!r} needs gpu > 0: trials only use the GPUs Ray assigns them")
        if self.gpu > 1 and self.gpu != int(self.gpu):
            raise ValueError(f"gpu={self.gpu} should be a fraction of one GPU (<= 1) or a whole number")
        return self


class StorageSection(_Section):
    """Where a study keeps its state. ``optuna``: an RDB URL (default SQLite in the study folder;
    PostgreSQL for clusters, password from the URL, ``PGPASSWORD`` or ``~/.pgpass``); ``mlflow``: a
    tracking URI (default SQLite in the study folder; ``http(s)://`` for an ``mlflow server``, credentials
    from ``MLFLOW_TRACKING_USERNAME``/``MLFLOW_TRACKING_PASSWORD``); ``ray_address``; ``ray_storage``: Ray
    Tune's own folder (default ``<study>/ray`` on the driver; a shared path or ``s3://...`` for clusters);
    ``lease_timeout_s``: a driver whose heartbeat is older than this is taken to be dead."""

    optuna: str | None = None
    mlflow: str | None = None
    ray_address: str | None = None
    ray_storage: str | None = None
    lease_timeout_s: float = Field(default=120.0, ge=5)

    @field_validator("optuna")
    @classmethod
    def _optuna(cls, v: str | None) -> str | None:
        if v is not None and not re.match(r"^(sqlite|postgresql|postgresql\+\w+|mysql(\+\w+)?)://", v):
            raise ValueError("an RDB URL: sqlite:///path.db or postgresql://user:pass@host/db")
        return v

    @field_validator("mlflow")
    @classmethod
    def _mlflow(cls, v: str | None) -> str | None:
        if v is not None and not re.match(r"^(sqlite|postgresql|mysql|https?|databricks)(\+\w+)?:", v):
            raise ValueError("sqlite:///path.db, a database URL, or an http(s):// tracking server")
        return v

    @model_validator(mode="after")
    def _remember_secrets(self) -> StorageSection:
        from search.redaction import remember_secrets

        # Whatever later prints an error about these URLs (a driver's message, a traceback's last line), the CLI
        # hides their passwords (search.cluster.storage.scrub_known).
        remember_secrets(self.optuna, self.mlflow, self.ray_address, self.ray_storage)
        return self


class StudyConfig(_Section):
    study: StudySection
    model: ModelSection = ModelSection()
    data: DataSection = DataSection()
    space: SpaceSection = SpaceSection()
    objectives: ObjectivesSection = ObjectivesSection()
    msft: MsftSection = MsftSection()
    seeds: SeedsSection = SeedsSection()
    early_stop: EarlyStopSection = EarlyStopSection()
    resources: ResourcesSection = ResourcesSection()
    storage: StorageSection = StorageSection()

    # -- derived paths ------------------------------------------------------------------------------
    @property
    def study_dir(self) -> Path:
        return (self.study.out_dir / self.study.name).resolve()

    @property
    def optuna_url(self) -> str:
        return self.storage.optuna or f"sqlite:///{self.study_dir / 'optuna.db'}"

    @property
    def mlflow_uri(self) -> str:
        return self.storage.mlflow or f"sqlite:///{self.study_dir / 'mlflow.db'}"

    @property
    def size_budget_bytes(self) -> int | None:
        mb = self.objectives.size_budget_mb
        return None if mb is None else int(mb * 1e6)

    def data_paths(self) -> DataPaths:
        d = self.data
        if d.train is not None and d.eval is not None and d.trials is not None:
            return DataPaths(d.train, d.eval, d.trials)
        assert d.corpus is not None
        return DataPaths.corpus(d.corpus)

    def workbench_spec(self) -> WorkbenchSpec:
        """The runtime form of ``[model]``, ``[data]`` and ``resources.device`` (absolute paths)."""
        return WorkbenchSpec(
            checkpoint=self.model.checkpoint.resolve(), data=self.data_paths().resolved(), arch=self.model.architecture,
            arch_kwargs=dict(self.model.arch_kwargs), cache_dir=self.data.cache_dir.resolve(),
            max_trials=self.data.max_trials, subset_seed=self.data.subset_seed, device=self.device,
            codebook_dir=self.study_dir / "codebooks", loading=self.data_loading(),
            train_subset=TrainingSubset(self.data.train_speakers, self.data.train_utts_per_speaker,
                                        self.data.train_subset_seed), p_target=self.objectives.p_target)

    @property
    def device(self) -> str:
        """The device of every step of the study: ``"cpu"`` when ``resources.gpu = 0`` (also on a machine with
        CUDA), else ``resources.device``; a trial then takes the GPU Ray assigned it (search.study.trial)."""
        return "cpu" if self.resources.gpu == 0 else self.resources.device

    def data_loading(self) -> DataLoading:
        """The runtime form of ``[data]``'s feature fields."""
        d = self.data
        return DataLoading(features=d.features, memory_budget_mb=d.memory_budget_mb, dtype=d.feature_dtype,
                           loader_workers=d.loader_workers)

    def msft_schedule(self) -> MsftSchedule:
        """The runtime form of ``[msft]``, seeded with ``study.seed``."""
        m = self.msft
        return MsftSchedule(order=m.order, total_steps=m.total_steps, n_groups=m.n_groups, lr=m.lr,
                            final_lr=m.final_lr, batch_size=m.batch_size, stage_eval_frames=m.stage_eval_frames, seed=self.study.seed,
                            kmqat=KMQATConfig(centroid_update=m.centroid_update, recluster_every=m.recluster_every))

    def digest(self) -> str:
        """Hash of everything that changes trial results (not n_trials/timeout/concurrency/storage)."""
        d = self.model_dump(mode="json")
        for k in ("n_trials", "timeout_s", "concurrency", "report_every"):
            d["study"].pop(k, None)
        d.pop("storage", None)
        for k in ("max_failures", "bad_nodes", "hessian"):  # where things run, not what they compute
            d["resources"].pop(k, None)
        # Fields added to [data] later enter the digest only when set away from their defaults, so a study
        # made before them keeps its digest (and resumes).
        for k in _DATA_FIELDS_SINCE_V2:
            if d["data"].get(k) == DataSection.model_fields[k].default:
                d["data"].pop(k, None)
        if d["model"].get("factory") is None:  # added later: absent from older studies' digests
            d["model"].pop("factory", None)
        if d["msft"].get("final_lr") == MsftSection.model_fields["final_lr"].default:
            d["msft"].pop("final_lr", None)
        o = d["objectives"]  # the accuracy default keeps the digest of studies made with `min_dcf = false`
        if o.get("accuracy") == "eer" and o.get("p_target") == ObjectivesSection.model_fields["p_target"].default:
            o.pop("accuracy"), o.pop("p_target")
            o["min_dcf"] = False
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    def public_dump(self) -> dict[str, Any]:
        """The config as JSON-ready data with every password in the storage URLs replaced by ``***``: what
        records, MLflow params, ``config.json`` artifacts and logs may show."""
        d = self.model_dump(mode="json")
        for key in ("optuna", "mlflow", "ray_address", "ray_storage"):
            if d["storage"].get(key):
                d["storage"][key] = redacted(d["storage"][key])
        return d

    def with_overrides(self, **study_fields: Any) -> StudyConfig:
        data = self.model_dump()
        data["study"].update({k: v for k, v in study_fields.items() if v is not None})
        return StudyConfig.model_validate(data)


def _format_error(err: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid study config"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        value = e.get("input")
        if loc.startswith("storage") and isinstance(value, str):  # a URL may carry a password
            value = redacted(value)
        shown = "" if isinstance(value, dict) else f" (got {value!r})"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown field"
        lines.append(f"  {loc}{shown}: {msg}")
    return "\n".join(lines)


def load_study_config(path: str | Path, **overrides: Any) -> StudyConfig:
    """Read and validate a study TOML; relative paths in it are resolved against the current directory."""
    path = Path(path)
    if path.is_dir():
        found = sorted(p.name for p in path.glob("*.toml"))[:5]
        raise ConfigError(f"study config {path} is a folder; give a study .toml file"
                          + (f" such as {path / found[0]} (there: {', '.join(found)})" if found else ""))
    if not path.is_file():
        raise ConfigError(f"study config {path} does not exist")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"study config {path} cannot be read: {exc}") from exc
    return parse_study_config(raw, source=str(path), **overrides)


def parse_study_config(raw: dict[str, Any], *, source: str = "<config>", **overrides: Any) -> StudyConfig:
    raw = json.loads(json.dumps(raw))  # deep copy of plain data
    raw.setdefault("study", {}).update({k: v for k, v in overrides.items() if v is not None})
    try:
        return StudyConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_error(exc, source)) from None
