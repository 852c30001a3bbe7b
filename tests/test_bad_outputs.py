"""Outputs and config paths that cannot be written or read as what they should be, for every command that takes
``--out``, ``--json`` or ``--cache`` and every path field of a study: exit 2 naming the flag or field, no traceback,
nothing written, no Ray started (the checks of tests/test_bad_input.py's ``refused``).

The usual trap: a path under a regular file (``F/x`` where ``F`` is a file), which ``mkdir`` answers with
``FileExistsError`` / ``NotADirectoryError`` only once work has started.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.test_bad_input import _write_study, refused


@pytest.fixture
def blocker(tmp_path: Path) -> Path:
    """A regular file where a folder is expected."""
    f = tmp_path / "afile"
    f.write_text("not a folder")
    return f


def _commands(inputs: dict[str, Path], toml: Path, tmp_path: Path) -> dict[str, list[str]]:
    """Every command writing a folder or file, with OUT where the bad path goes."""
    corpus, ckpt = str(inputs["corpus"]), str(inputs["checkpoint"])
    cache = ["--cache", str(inputs["cache"])]
    evaluate = ["evaluate", "--model", ckpt, "--data", f"{corpus}/eval", "--trials", f"{corpus}/eval/trials"]
    quantize = ["quantize", "--model", ckpt, "--corpus", corpus, "--bits", "4", "--steps", "0"]
    return {
        "corpus-synth-out": ["corpus", "synth", "--out", "OUT", "--speakers", "4", "--utts", "2",
                             "--eval-speakers", "2"],
        "train-out": ["train", "--corpus", corpus, "--out", "OUT", "--steps", "1", *cache],
        "train-cache": ["train", "--corpus", corpus, "--out", str(tmp_path / "t.safetensors"), "--steps", "1",
                        "--cache", "OUT"],
        "quantize-out": [*quantize, *cache, "--out", "OUT"],
        "quantize-json": [*quantize, *cache, "--json", "OUT"],
        "quantize-cache": [*quantize, "--cache", "OUT"],
        "evaluate-json": [*evaluate, *cache, "--json", "OUT"],
        "evaluate-cache": [*evaluate, "--cache", "OUT"],
        "data-prepare-out": ["data", "prepare", "voxceleb", "--root", str(tmp_path), "--out", "OUT"],
        "data-cache-cache": ["data", "cache", f"{corpus}/eval", "--cache", "OUT"],
        "data-audit-cache": ["data", "audit", f"{corpus}/eval", "--cache", "OUT"],
        "export-out": ["export", str(toml), "--knee", "--out", "OUT"],
        "report-out": ["report", str(toml), "--out", "OUT"],
    }


COMMANDS = ["corpus-synth-out", "train-out", "train-cache", "quantize-out", "quantize-json", "quantize-cache",
            "evaluate-json", "evaluate-cache", "data-prepare-out", "data-cache-cache", "data-audit-cache",
            "export-out", "report-out"]


@pytest.mark.parametrize("command", COMMANDS)
def test_output_under_a_regular_file(command: str, blocker: Path, tiny_study_inputs: dict[str, Path],
                                     tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    toml = _write_study(tiny_study_inputs, tmp_path)
    argv = _commands(tiny_study_inputs, toml, tmp_path)[command]
    bad = blocker / "sub" / "x.json"
    flag = argv[argv.index("OUT") - 1]
    argv = [str(bad) if a == "OUT" else a for a in argv]
    refused(argv, capsys, tmp_path, flag, str(bad), f"{blocker} is a file, not a folder",
            skip=(tiny_study_inputs["cache"],))
    assert blocker.read_text() == "not a folder"


FOLDER_FLAGS = ["corpus-synth-out", "train-cache", "quantize-cache", "evaluate-cache", "data-prepare-out",
                "data-cache-cache", "data-audit-cache", "export-out", "report-out"]


@pytest.mark.parametrize("command", FOLDER_FLAGS)
def test_folder_flag_given_a_file(command: str, blocker: Path, tiny_study_inputs: dict[str, Path], tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    """A folder flag (``--out DIR``, ``--cache DIR``) naming an existing regular file."""
    toml = _write_study(tiny_study_inputs, tmp_path)
    argv = _commands(tiny_study_inputs, toml, tmp_path)[command]
    flag = argv[argv.index("OUT") - 1]
    argv = [str(blocker) if a == "OUT" else a for a in argv]
    refused(argv, capsys, tmp_path, flag, str(blocker), "exists and is not a folder", skip=(tiny_study_inputs["cache"],))
    assert blocker.read_text() == "not a folder"


def _config_cases(inputs: dict[str, Path], blocker: Path, tmp_path: Path) -> dict[str, tuple[dict, tuple[str, ...]]]:
    corpus = inputs["corpus"]
    split = {"train": str(corpus / "train"), "eval": str(corpus / "eval"), "trials": str(corpus / "eval" / "trials")}
    return {
        "corpus-is-a-file": ({"data": {"corpus": str(blocker)}}, ("data.corpus", "is a file")),
        "cache-is-a-file": ({"data": {"cache_dir": str(blocker)}}, ("data.cache_dir", "is not a folder")),
        "cache-under-a-file": ({"data": {"cache_dir": str(blocker / "c")}}, ("data.cache_dir", "is a file")),
        "out-dir-under-a-file": ({"study": {"out_dir": str(blocker / "runs")}}, ("study.out_dir", "is a file")),
        "ray-storage-under-a-file": ({"storage": {"ray_storage": str(blocker / "r")}},
                                     ("storage.ray_storage", "is a file")),
        "train-is-a-file": ({"data": {**split, "train": str(blocker)}}, ("data.train", "is a file")),
        "eval-is-a-file": ({"data": {**split, "eval": str(blocker)}}, ("data.eval", "is a file")),
        "trials-is-a-folder": ({"data": {**split, "trials": str(tmp_path)}}, ("data.trials", "is a folder")),
        "checkpoint-is-a-folder": ({"model": {"checkpoint": str(tmp_path)}}, ("model.checkpoint", "is a folder")),
        "optuna-under-a-file": ({"storage": {"optuna": f"sqlite:///{blocker / 'o.db'}"}}, ("storage.optuna",)),
        "mlflow-under-a-file": ({"storage": {"mlflow": f"sqlite:///{blocker / 'm.db'}"}}, ("storage.mlflow",)),
    }


CONFIG_CASES = ["corpus-is-a-file", "cache-is-a-file", "cache-under-a-file", "out-dir-under-a-file",
                "ray-storage-under-a-file", "train-is-a-file", "eval-is-a-file", "trials-is-a-folder",
                "checkpoint-is-a-folder", "optuna-under-a-file", "mlflow-under-a-file"]


@pytest.mark.parametrize("case", CONFIG_CASES)
def test_study_paths_of_the_wrong_kind(case: str, blocker: Path, tiny_study_inputs: dict[str, Path],
                                       tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sections, expected = _config_cases(tiny_study_inputs, blocker, tmp_path)[case]
    toml = _write_study(tiny_study_inputs, tmp_path, **sections)
    refused(["run", str(toml)], capsys, tmp_path, *expected, skip=(tiny_study_inputs["cache"],))
    assert blocker.read_text() == "not a folder" and not (tmp_path / "runs").exists()
