"""Speaker-verification data listings: Kaldi data dirs and VoxCeleb folders.

A :class:`DataSet` is the one in-memory form: utterance id -> audio path and utterance id -> speaker.
Readers validate everything they read and name the file and line of any problem.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from lsv_core.errors import DataError


@dataclass(frozen=True, slots=True)
class Utterance:
    """One listed utterance. The path is kept as text (``location``) and made a :class:`Path` on access:
    a million Path objects alone would take several hundred MB in every process that reads a listing."""

    utt: str
    speaker: str
    location: str

    @property
    def path(self) -> Path:
        return Path(self.location)


@dataclass
class DataSet:
    """Utterances of one split, in listing order (ids are unique)."""

    root: Path
    utterances: dict[str, Utterance] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.utterances)

    def __iter__(self) -> Iterator[Utterance]:
        return iter(self.utterances.values())

    def __contains__(self, utt: object) -> bool:
        return utt in self.utterances

    @property
    def speakers(self) -> list[str]:
        return sorted({u.speaker for u in self.utterances.values()})

    def spk2utt(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for u in self.utterances.values():
            out.setdefault(u.speaker, []).append(u.utt)
        return out

    def subset(self, utts: list[str]) -> DataSet:
        return DataSet(self.root, {u: self.utterances[u] for u in utts})

    def check_audio(self) -> None:
        """Fail early, naming the utterance, if any listed file is missing (before any worker starts)."""
        for u in self.utterances.values():
            if not u.path.is_file():
                raise DataError(f"{self.root}: utterance {u.utt} points to missing audio file {u.path}")


def _read_table(path: Path, min_fields: int) -> Iterator[tuple[int, list[str]]]:
    """Yield (line number, fields) of a whitespace-separated Kaldi table; blank lines are skipped."""
    if not path.is_file():
        raise DataError(f"{path} does not exist")
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) < min_fields:
                raise DataError(
                    f"{path}:{lineno}: expected at least {min_fields} fields, got {len(fields)}: {line.strip()!r}"
                )
            yield lineno, fields


def read_kaldi_dir(data_dir: str | Path) -> DataSet:
    """Read a Kaldi data dir (``wav.scp`` and ``utt2spk``; ``spk2utt`` is checked when present).

    ``wav.scp`` entries must be plain file paths (pipes are not supported); relative paths are resolved
    against the data dir, so a corpus folder can be moved.
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"data dir {data_dir} does not exist")
    wav_scp, utt2spk_file = data_dir / "wav.scp", data_dir / "utt2spk"
    paths: dict[str, tuple[str, int]] = {}
    base = str(data_dir)
    for lineno, fields in _read_table(wav_scp, 2):
        utt = fields[0]
        if utt in paths:
            raise DataError(
                f"{wav_scp}:{lineno}: duplicate utterance id {utt!r} (first at line {paths[utt][1]})"
            )
        if len(fields) != 2 or fields[-1] == "|":
            raise DataError(f"{wav_scp}:{lineno}: expected '<utt> <path>'; pipes/commands are not supported")
        p = fields[1]
        paths[utt] = (p if os.path.isabs(p) else os.path.join(base, p), lineno)
    if not paths:  # an empty listing is a mistake (a failed preparation), never "0 files, all fine"
        raise DataError(f"{wav_scp} lists no utterances; expected one '<utt> <path>' line per audio file")
    spk_of: dict[str, str] = {}
    for lineno, fields in _read_table(utt2spk_file, 2):
        utt, spk = fields[0], fields[1]
        if utt in spk_of:
            raise DataError(f"{utt2spk_file}:{lineno}: duplicate utterance id {utt!r}")
        if utt not in paths:
            raise DataError(f"{utt2spk_file}:{lineno}: utterance {utt!r} is not in {wav_scp}")
        spk_of[utt] = spk
    missing = [u for u in paths if u not in spk_of]
    if missing:
        raise DataError(
            f"{wav_scp}:{paths[missing[0]][1]}: utterance {missing[0]!r} has no speaker in {utt2spk_file}"
            f" ({len(missing)} such utterances)"
        )
    spk2utt_file = data_dir / "spk2utt"
    if spk2utt_file.exists():
        for lineno, fields in _read_table(spk2utt_file, 2):
            spk = fields[0]
            for utt in fields[1:]:
                if spk_of.get(utt) != spk:
                    raise DataError(
                        f"{spk2utt_file}:{lineno}: utterance {utt!r} listed under speaker {spk!r} "
                        f"but utt2spk says {spk_of.get(utt)!r}"
                    )
    utts = {u: Utterance(u, spk_of[u], p) for u, (p, _) in paths.items()}
    return DataSet(data_dir, utts)


def read_voxceleb_dir(root: str | Path, *, ext: str | None = None) -> DataSet:
    """Read a VoxCeleb folder ``<spk>/<video>/<n>.wav`` (or ``.m4a``, VoxCeleb2's; ``ext`` picks one);
    utterance ids are ``<spk>/<video>/<n>.<ext>``.

    That id form is the one VoxCeleb trial lists use, so they match without a mapping file.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"VoxCeleb folder {root} does not exist")
    utts: dict[str, Utterance] = {}
    paths = root.glob(f"*/*/*{ext}") if ext else (p for p in root.glob("*/*/*") if p.suffix in (".wav", ".m4a"))
    for path in sorted(paths):
        rel = path.relative_to(root).as_posix()
        spk = rel.split("/", 1)[0]
        utts[rel] = Utterance(rel, spk, str(path))
    if not utts:
        raise DataError(f"VoxCeleb folder {root} holds no <spk>/<video>/<n>{ext or '.wav/.m4a'} files")
    return DataSet(root, utts)


def read_data(path: str | Path) -> DataSet:
    """Read a Kaldi dir (when it holds ``wav.scp``) or else a VoxCeleb folder."""
    path = Path(path)
    return read_kaldi_dir(path) if (path / "wav.scp").exists() else read_voxceleb_dir(path)
