"""The study record: what a study was made from, kept with the study's trials in its Optuna storage.

It holds the config digest (a study is resumed only with the config it was made with), the config
itself, the baseline's quantizable layer order, its ``state_dict`` digest, fp32 packed size and
training-time evaluation, and the Hessian traces and the unit probes (``sampler = "probe"``) once they
are computed. It is kept in the study's Optuna *system* attr ``lsv.record`` (:mod:`search.results.system_attrs`;
studies made before kept it in a user attr, still read). Readers (``lsv status``, ``lsv report``, ``lsv export``) take these from the record instead
of loading the baseline's weights, so they work from any machine that reaches the storage. A copy is
written to ``<study dir>/study.json`` for people and scripts on the driver's machine.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lsv_core.atomic import write_text_atomic
from lsv_core.errors import LsvError
from search.results.system_attrs import set_study_data, study_data

if TYPE_CHECKING:
    import optuna

__all__ = ["RECORD_ATTR", "StudyNotRun", "StudyRecord", "save_record", "stored_record"]

RECORD_ATTR = "lsv.record"
RECORD_FORMAT = "lsv-study-record/1"


class StudyNotRun(LsvError):
    """The study has no record yet: ``lsv run`` has not created it (or it lives in another storage)."""


@dataclass(frozen=True)
class StudyRecord:
    """See the module docstring. EER in percent, sizes in bytes."""

    name: str
    digest: str
    config: Mapping[str, Any]
    layers: list[str] | None = None  # quantizable layers of the baseline, in model order
    baseline_digest: str | None = None  # lsv_core.quant.sensitivity.state_dict_digest of the baseline
    fp32_bytes: int | None = None
    baseline_eval: Mapping[str, Any] | None = None  # the checkpoint's own evaluation (lsv train), if any
    hessian_traces: Mapping[str, float] | None = None  # per layer, once computed
    unit_probes: Mapping[str, Any] | None = None  # lsv_core.quant.probe.ProbeResult.to_dict(), once measured
    lsv_version: str | None = None
    # What size_bytes counts: the bytes of this deployable file format (lsv_core.export.CODEBOOK_ONNX_FORMAT).
    # None: a study made when sizes counted the packed tensors only (not comparable with today's).
    size_format: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"format": RECORD_FORMAT, **asdict(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StudyRecord:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)

    def with_traces(self, traces: Mapping[str, float]) -> StudyRecord:
        return replace(self, hessian_traces={k: float(v) for k, v in traces.items()})

    def with_probes(self, probes: Mapping[str, Any]) -> StudyRecord:
        return replace(self, unit_probes=dict(probes))


def save_record(study: optuna.Study, study_dir: Path | None, record: StudyRecord) -> None:
    """Store ``record`` in the study's storage (the source of truth) and copy it to ``study.json``."""
    data = record.to_dict()
    set_study_data(study, RECORD_ATTR, data)  # machine data (traces, probes, config): a system attr
    if isinstance(study.user_attrs.get(RECORD_ATTR), Mapping):  # a study made before: leave a pointer
        study.set_user_attr(RECORD_ATTR, f"moved to the study's Optuna system attr {RECORD_ATTR!r}")
    if study_dir is not None:
        study_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(study_dir / "study.json", json.dumps(data, indent=2), overwrite=True)


def stored_record(study: optuna.Study) -> StudyRecord | None:
    data = study_data(study, RECORD_ATTR, old_user_attr=RECORD_ATTR)  # older studies: a user attr
    return StudyRecord.from_dict(data) if isinstance(data, Mapping) else None
