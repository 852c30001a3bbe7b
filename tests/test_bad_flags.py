"""Every numeric flag of every `lsv` command has a declared range, refused by argparse before the command runs
(exit 2, the flag and what is allowed named, no traceback, nothing read or written); empty data listings; and
`lsv train` of an architecture other than the thin CPU net (its defaults used to leak into every model).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from search.cli import build_parser, main
from search.flags import Bounded

REPO = Path(__file__).resolve().parents[1]


def _numeric_flags(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...],
                                                                                             argparse.Action]]:
    """(command path, action) of every option that takes a number, through every sub-command."""
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found += _numeric_flags(sub, (*path, name))
        elif action.option_strings and (action.type in (int, float) or isinstance(action.type, Bounded)):
            found.append((path, action))
    return found


FLAGS = _numeric_flags(build_parser())
BOUNDED = [(path, a) for path, a in FLAGS if isinstance(a.type, Bounded)]


def _id(case: tuple[tuple[str, ...], argparse.Action]) -> str:
    return " ".join(case[0]) + " " + case[1].option_strings[-1]


def _outside(t: Bounded) -> list[str]:
    """Values just outside the range, and words that are not numbers of the flag's kind."""
    step = 1 if t.kind is int else 0.5
    bad = [f"{t.ge - step:g}" if t.ge is not None else None, f"{t.gt:g}" if t.gt is not None else None,
           f"{t.le + step:g}" if t.le is not None else None, "x"]
    bad += ["1.5"] if t.kind is int else ["nan", "inf"]
    return [b for b in bad if b is not None]


def test_every_numeric_flag_declares_its_range() -> None:
    assert len(FLAGS) >= 30  # the walk reaches the sub-commands (corpus synth, data cache, ...)
    raw = [_id(c) for c in FLAGS if not isinstance(c[1].type, Bounded) and c[1].choices is None]
    assert raw == [], f"numeric flags without a range (use search.flags.Bounded): {raw}"


@pytest.mark.parametrize("case", BOUNDED, ids=_id)
def test_out_of_range_values_are_refused_naming_the_flag(case: tuple[tuple[str, ...], argparse.Action],
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    path, action = case
    flag, t = action.option_strings[-1], action.type
    for value in _outside(t):
        with pytest.raises(SystemExit) as exc:
            main([*path, f"{flag}={value}"])
        err = capsys.readouterr().err
        assert exc.value.code == 2, (flag, value)
        assert f"argument {flag}" in err and "should be" in err and t.allowed() in err, err
        assert "Traceback" not in err
    for bound in (t.ge, t.gt, t.le):  # the bounds themselves: >= and <= include them, > excludes
        if bound is not None and bound != t.gt:
            assert t(f"{bound:g}") == bound
    if action.default is not None:  # a default outside its own range would be refused only when typed
        assert t(str(action.default)) == action.default


def test_library_bounds_are_the_flags_bounds() -> None:
    from lsv_core.data.loader import DataLoading
    from lsv_core.data.store import StoreConfig
    from lsv_core.data.subset import TrainingSubset
    from lsv_core.quant.msft import MsftSchedule
    from lsv_core.settings import bounds_of

    by_flag = {_id(c): c[1].type for c in BOUNDED}
    for flag, (cls, name) in {"data cache --shard-utts": (StoreConfig, "shard_utts"),
                              "quantize --steps": (MsftSchedule, "total_steps"),
                              "quantize --lr": (MsftSchedule, "lr"),
                              "quantize --batch-size": (MsftSchedule, "batch_size"),
                              "quantize --train-speakers": (TrainingSubset, "speakers"),
                              "evaluate --loader-workers": (DataLoading, "loader_workers")}.items():
        t = by_flag[flag]
        assert {k: getattr(t, k) for k in ("ge", "gt", "le") if getattr(t, k) is not None} == bounds_of(cls, name)


def _lsv(*argv: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "search.cli", *argv], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=120)


def test_data_commands_refuse_before_hashing_or_writing(kaldi_dir: Path, tmp_path: Path) -> None:
    # Run as a user runs it (a process of its own); the other flags are covered in-process above.
    cache = tmp_path / "cache"
    res = _lsv("data", "cache", str(kaldi_dir), "--cache", str(cache), "--shard-utts", "0", cwd=tmp_path)
    assert res.returncode == 2 and "argument --shard-utts: 0 should be >= 1" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr
    assert not cache.exists() and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("command", ["audit", "cache"])
def test_an_empty_wav_scp_is_refused(command: str, kaldi_dir: Path, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    for wav_scp_text in ("", "\n\n"):
        (kaldi_dir / "wav.scp").write_text(wav_scp_text)
        (kaldi_dir / "utt2spk").write_text("")
        cache = tmp_path / "cache"
        assert main(["data", command, str(kaldi_dir), "--cache", str(cache)]) == 2
        err = " ".join(capsys.readouterr().err.split())
        assert f"{kaldi_dir / 'wav.scp'} lists no utterances" in err and "0 files" not in err, err
        assert not cache.exists()


def test_train_another_architecture(kaldi_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from lsv_core.models import load_checkpoint

    out = tmp_path / "r18.safetensors"
    argv = ["train", "--train", str(kaldi_dir), "--model", "ResNet18", "--steps", "1", "--batch-size", "2",
            "--device", "cpu", "--out", str(out)]
    assert main([*argv, "--m-channels", "4"]) == 2  # the thin net's width is no argument of WeSpeaker's ResNet18
    err = " ".join(capsys.readouterr().err.split())
    assert "--model: ResNet18: unknown argument(s) ['m_channels']" in err and "allowed:" in err, err
    assert not out.exists()
    assert main(argv) == 0, capsys.readouterr().err
    model, _ = load_checkpoint(out)
    assert model.arch["name"] == "ResNet18" and "first_stride" not in model.arch["kwargs"]
    summary = json.loads(out.with_suffix(".json").read_text())
    assert summary["config"]["model"] == "ResNet18" and summary["config"]["model_kwargs"] == {}
