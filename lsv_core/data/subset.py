"""Seeded training subsets: a search trial rarely needs all of VoxCeleb2 to fine-tune a quantized network."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lsv_core.data.manifest import DataSet
from lsv_core.errors import ConfigError
from lsv_core.settings import check_settings, setting

__all__ = ["TrainingSubset", "select_training_utts"]


@dataclass(frozen=True)
class TrainingSubset:
    """``speakers`` random speakers (None: all) and at most ``utts_per_speaker`` random utterances of
    each (None: all), drawn with ``seed``. The AAM head keeps every class: labels are indices into the
    sorted speakers of the whole training set, so a subset fine-tunes the same head."""

    speakers: int | None = setting(None, ge=1, optional=True)
    utts_per_speaker: int | None = setting(None, ge=1, optional=True)
    seed: int = setting(0, ge=0)

    def __post_init__(self) -> None:
        check_settings(self)

    @property
    def is_full(self) -> bool:
        return self.speakers is None and self.utts_per_speaker is None


def select_training_utts(data: DataSet, subset: TrainingSubset) -> list[str]:
    """The utterances of ``subset`` in ``data``'s listing order (the same for the same seed and data)."""
    if subset.is_full:
        return list(data.utterances)
    spk2utt = data.spk2utt()
    speakers = sorted(spk2utt)
    rng = np.random.default_rng(subset.seed)
    if subset.speakers is not None:
        if subset.speakers > len(speakers):
            raise ConfigError(f"train_speakers={subset.speakers} but {data.root} has only {len(speakers)} speakers")
        speakers = sorted(rng.choice(speakers, subset.speakers, replace=False).tolist())
    keep: set[str] = set()
    for spk in speakers:
        utts = spk2utt[spk]
        k = subset.utts_per_speaker
        if k is not None and len(utts) > k:
            utts = [utts[i] for i in sorted(rng.choice(len(utts), k, replace=False).tolist())]
        keep.update(utts)
    return [u for u in data.utterances if u in keep]
