"""Trial lists in VoxCeleb form (``1 enroll.wav test.wav``) and Kaldi form (``enroll test target``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lsv_core.data.manifest import DataSet
from lsv_core.errors import DataError

_KALDI_LABELS = {"target": 1, "nontarget": 0}


@dataclass(frozen=True)
class Trials:
    enroll: list[str]
    test: list[str]
    labels: np.ndarray  # int8, 1 = same speaker
    source: Path

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def utterances(self) -> list[str]:
        return sorted(set(self.enroll) | set(self.test))

    @property
    def n_target(self) -> int:
        return int(self.labels.sum())


def read_trials(path: str | Path, data: DataSet | None = None) -> Trials:
    """Read a trial list, detecting its form per line; with ``data``, every id must be in it."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"trial list {path} does not exist")
    enroll: list[str] = []
    test: list[str] = []
    labels: list[int] = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            f = line.split()
            if not f:
                continue
            if len(f) != 3:
                raise DataError(f"{path}:{lineno}: expected 3 fields, got {len(f)}: {line.strip()!r}")
            if f[0] in ("0", "1"):
                lab, e, t = int(f[0]), f[1], f[2]
            elif f[2] in _KALDI_LABELS:
                e, t, lab = f[0], f[1], _KALDI_LABELS[f[2]]
            else:
                raise DataError(
                    f"{path}:{lineno}: not a trial line; expected '1|0 enroll test' (VoxCeleb) or "
                    f"'enroll test target|nontarget' (Kaldi): {line.strip()!r}"
                )
            if data is not None:
                for utt in (e, t):
                    if utt not in data:
                        raise DataError(
                            f"{path}:{lineno}: utterance {utt!r} is not in the data at {data.root}"
                        )
            enroll.append(e)
            test.append(t)
            labels.append(lab)
    if not labels:
        raise DataError(f"trial list {path} holds no trials")
    lab_arr = np.asarray(labels, dtype=np.int8)
    if lab_arr.min() == lab_arr.max():
        raise DataError(f"trial list {path} holds only {'target' if lab_arr[0] else 'nontarget'} trials")
    return Trials(enroll, test, lab_arr, path)
