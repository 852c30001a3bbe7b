"""VoxCeleb1/VoxCeleb2 as distributed -> Kaldi data dirs and Vox1-O/E/H trial lists (WeSpeaker's layout).

The download layout: VoxCeleb1 ``.../wav/id1XXXX/<video>/<n>.wav`` (dev and test, often merged),
VoxCeleb2 ``.../dev/aac/id0XXXX/<video>/<n>.m4a`` and ``.../test/aac/...``, and the trial lists
``veri_test2.txt`` (Vox1-O cleaned), ``list_test_all2.txt`` (Vox1-E cleaned), ``list_test_hard2.txt``
(Vox1-H cleaned) and their uncleaned versions without the ``2``. Speakers are told apart by their ids
(VoxCeleb1 ``id1....``, VoxCeleb2 ``id0....``) and VoxCeleb2's dev/test by a ``test`` folder in the path.

Output (``out``): ``vox1/``, ``vox2_dev/``, ``vox2_test/`` (those present), each with ``wav.scp`` (absolute
paths under ``root`` as given: symbolic links are followed while searching but kept in the paths, so nodes
that reach the data through another mount or link read the same list), ``utt2spk`` and ``spk2utt``; utterance ids are the ``<spk>/<video>/<n>.<ext>`` paths the trial
lists use; trials as ``vox1/vox1_{O,E,H}[_cleaned].kaldi`` (``enroll test target|nontarget``), every id
checked against VoxCeleb1. ``.m4a`` stays as it is (read with PyAV) unless ``convert_m4a`` decodes it once
to 16 kHz PCM WAV under ``out/wav/`` (parallel, resumable: a converted file is complete or absent).
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soundfile as sf

from lsv_core.atomic import atomic_path, check_writable, replace_dir
from lsv_core.data.audio import SAMPLE_RATE, read_audio
from lsv_core.data.manifest import read_kaldi_dir
from lsv_core.data.trials import read_trials
from lsv_core.errors import DataError

__all__ = ["VoxCelebSummary", "prepare_voxceleb"]

_SPEAKER_RE = re.compile(r"^id\d{5}$")
TRIAL_LISTS = {
    "veri_test2.txt": "vox1_O_cleaned.kaldi", "list_test_all2.txt": "vox1_E_cleaned.kaldi",
    "list_test_hard2.txt": "vox1_H_cleaned.kaldi", "veri_test.txt": "vox1_O.kaldi",
    "list_test_all.txt": "vox1_E.kaldi", "list_test_hard.txt": "vox1_H.kaldi",
}


@dataclass
class VoxCelebSummary:
    """What was written: utterances and speakers per data dir, trials per list."""

    out: Path
    sets: dict[str, dict[str, int]] = field(default_factory=dict)
    trials: dict[str, int] = field(default_factory=dict)
    converted: int = 0


def _files(root: Path, suffixes: tuple[str, ...]) -> Iterable[Path]:
    """Files under ``root`` ending in ``suffixes``, in sorted order, through symlinked folders too (on
    clusters ``voxceleb1/`` is often a link to shared storage); a folder reached twice (a link to a folder
    also under ``root``, a link cycle) is walked once."""
    seen: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        st = os.stat(dirpath)
        if (st.st_dev, st.st_ino) in seen:
            dirnames.clear()
            continue
        seen.add((st.st_dev, st.st_ino))
        dirnames.sort()
        for name in sorted(filenames):
            if name.endswith(suffixes):
                yield Path(dirpath) / name


def _classify(root: Path, out: Path) -> dict[str, dict[str, Path]]:
    """{set name: {utterance id: path}} for every ``id?????/<video>/<n>.(wav|m4a)`` under ``root``."""
    sets: dict[str, dict[str, Path]] = {}
    out = out.resolve()
    for path in _files(root, (".wav", ".m4a")):
        if out in path.resolve().parents:
            continue  # our own converted files, when out lies under root
        spk, video = path.parent.parent.name, path.parent.name
        if not _SPEAKER_RE.match(spk):
            continue
        utt = f"{spk}/{video}/{path.name}"
        if spk.startswith("id1"):
            name = "vox1"
        else:
            folders = [p.lower() for p in path.relative_to(root).parts[:-3]]
            name = "vox2_test" if any("test" in p for p in folders) else "vox2_dev"
        bucket = sets.setdefault(name, {})
        if utt in bucket:
            raise DataError(f"{path}: utterance {utt} also at {bucket[utt]} (two copies of the same file)")
        bucket[utt] = path  # not resolved: the path through the user's links
    return sets


def _convert_one(job: tuple[str, str]) -> None:
    src, dst = job
    if Path(dst).exists():
        return  # written atomically before: complete
    wav = read_audio(src, resample=True, where=f"converting {src}")
    with atomic_path(dst, overwrite=True) as tmp:
        sf.write(tmp, wav, SAMPLE_RATE, subtype="PCM_16", format="WAV")


def _convert(utts: dict[str, Path], wav_root: Path, workers: int, progress: bool) -> dict[str, Path]:
    from tqdm import tqdm

    jobs, out = [], {}
    for utt, src in utts.items():
        if src.suffix.lower() != ".m4a":
            out[utt] = src
            continue
        dst = (wav_root / utt).with_suffix(".wav")
        dst.parent.mkdir(parents=True, exist_ok=True)
        jobs.append((str(src), str(dst)))
        out[utt] = dst
    with tqdm(total=len(jobs), desc="m4a -> wav", unit="file", disable=not progress) as bar:
        if workers > 1 and len(jobs) > 8:
            with ProcessPoolExecutor(workers) as pool:
                for _ in pool.map(_convert_one, jobs, chunksize=8):
                    bar.update()
        else:
            for job in jobs:
                _convert_one(job)
                bar.update()
    return out


def _write_kaldi(folder: Path, utts: dict[str, Path]) -> None:
    folder.mkdir(parents=True)
    spk2utt: dict[str, list[str]] = {}
    with open(folder / "wav.scp", "w") as scp, open(folder / "utt2spk", "w") as u2s:
        for utt in sorted(utts):
            spk = utt.split("/", 1)[0]
            scp.write(f"{utt} {utts[utt]}\n")
            u2s.write(f"{utt} {spk}\n")
            spk2utt.setdefault(spk, []).append(utt)
    (folder / "spk2utt").write_text("".join(f"{s} {' '.join(us)}\n" for s, us in sorted(spk2utt.items())))


def _write_trials(src: Path, dst: Path, vox1_dir: Path) -> int:
    trials = read_trials(src, read_kaldi_dir(vox1_dir))  # every id must be in VoxCeleb1: file:line otherwise
    labels = np.where(trials.labels == 1, "target", "nontarget")
    dst.write_text("".join(f"{e} {t} {lab}\n" for e, t, lab in zip(trials.enroll, trials.test, labels, strict=True)))
    return len(trials)


def prepare_voxceleb(root: str | Path, out: str | Path, *, convert_m4a: bool = False, workers: int | None = None,
                     overwrite: bool = False, progress: bool = True) -> VoxCelebSummary:
    """Write Kaldi data dirs and trial lists for the VoxCeleb tree under ``root`` into ``out`` (see the
    module docstring). ``out`` is created whole or not at all; an existing one is replaced only with
    ``overwrite``. Converted WAVs (``convert_m4a``) go to ``out/wav`` and survive an interrupted run."""
    # Absolute but not resolved (abspath only folds "..") so that wav.scp keeps the user's links.
    root, out = Path(os.path.abspath(root)), Path(os.path.abspath(out))
    if not root.is_dir():
        raise DataError(f"VoxCeleb root {root} does not exist")
    check_writable(out, overwrite)
    sets = _classify(root, out)
    if not sets:
        raise DataError(f"{root} holds no VoxCeleb audio (<id?????>/<video>/<n>.wav or .m4a)")
    lists = {p.name: p for p in _files(root, (".txt",)) if p.name in TRIAL_LISTS}
    if lists and "vox1" not in sets:
        raise DataError(f"{root} holds trial lists ({', '.join(sorted(lists))}) but no VoxCeleb1 audio (id1....)")
    summary = VoxCelebSummary(out)
    # Beside out (same filesystem, so the final rename is cheap), kept across interrupted runs.
    wav_root = out.parent / f".{out.name}.wav"
    final_wav = out / "wav"
    if convert_m4a:
        workers = workers or min(len(os.sched_getaffinity(0)), 8)
        for name, utts in sets.items():
            converted = _convert(utts, wav_root, workers, progress)
            summary.converted += sum(1 for p in utts.values() if p.suffix.lower() == ".m4a")
            sets[name] = {u: final_wav / p.relative_to(wav_root) if p.is_relative_to(wav_root) else p
                          for u, p in converted.items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for name, utts in sorted(sets.items()):
            _write_kaldi(staging / name, utts)
            summary.sets[name] = {"utterances": len(utts), "speakers": len({u.split("/", 1)[0] for u in utts})}
        for src_name, src in lists.items():
            summary.trials[TRIAL_LISTS[src_name]] = _write_trials(src, staging / "vox1" / TRIAL_LISTS[src_name],
                                                                  staging / "vox1")
        if convert_m4a and wav_root.exists():
            os.replace(wav_root, staging / "wav")
        replace_dir(staging, out, overwrite=overwrite)
    finally:
        if staging.exists():
            import shutil

            shutil.rmtree(staging, ignore_errors=True)
    return summary
