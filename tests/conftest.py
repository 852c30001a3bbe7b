"""Shared fixtures: small real audio written to disk and read back through the real readers."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

# Two cores: keep each test process from oversubscribing them.
os.environ.setdefault("OMP_NUM_THREADS", "1")


def write_tone(path: Path, seconds: float = 1.0, sr: int = 16000, freq: float = 220.0, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    wav = 0.3 * np.sin(2 * np.pi * freq * t) + 0.01 * rng.standard_normal(t.size)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, wav.astype(np.float32), sr, subtype="PCM_16")
    return path


@pytest.fixture
def kaldi_dir(tmp_path: Path) -> Path:
    """A 2-speaker Kaldi data dir with relative wav.scp paths."""
    d = tmp_path / "data"
    d.mkdir()
    lines, u2s = [], []
    for spk, freq in (("spkA", 200.0), ("spkB", 330.0)):
        for i in range(3):
            utt = f"{spk}-{i}"
            write_tone(tmp_path / "wav" / f"{utt}.wav", freq=freq * (1 + 0.01 * i), seed=i)
            lines.append(f"{utt} ../wav/{utt}.wav")
            u2s.append(f"{utt} {spk}")
    (d / "wav.scp").write_text("\n".join(lines) + "\n")
    (d / "utt2spk").write_text("\n".join(u2s) + "\n")
    return d


@pytest.fixture(scope="session")
def tiny_study_inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A real (small) espeak-ng corpus and a briefly trained thin baseline, shared by the search tests."""
    from lsv_core.data.synth import SynthConfig, synthesize_corpus
    from lsv_core.train import TrainConfig, train_baseline

    root = tmp_path_factory.mktemp("study_inputs")
    corpus = root / "corpus"
    synthesize_corpus(corpus, SynthConfig(speakers=16, utts=6, eval_speakers=6, seed=1), workers=2, progress=False)
    cfg = TrainConfig(steps=40, batch_size=16, device="cpu",
                      model_kwargs={"m_channels": 4, "first_stride": 2, "embed_dim": 32})
    ckpt = root / "baseline.safetensors"
    train_baseline(cfg, corpus / "train", out=ckpt, eval_dir=corpus / "eval", trials=corpus / "eval" / "trials",
                   cache_dir=root / "cache", progress=False)
    return {"corpus": corpus, "checkpoint": ckpt, "cache": root / "cache", "root": root}


@pytest.fixture(scope="session")
def default_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default embedded corpus (``SynthConfig()``, what `make demo` makes), synthesized once per session:
    the corpus the shipped baselines were trained on (about 80 s on 2 cores)."""
    from lsv_core.data.synth import SynthConfig, synthesize_corpus

    corpus = tmp_path_factory.mktemp("default_corpus") / "corpus"
    synthesize_corpus(corpus, SynthConfig(), workers=2, progress=False)
    return corpus


def study_raw_config(inputs: dict[str, Path], out_dir: Path, name: str = "t", **sections: dict) -> dict:
    """A small, fast study config over ``tiny_study_inputs`` (sections override defaults key by key)."""
    raw: dict = {
        "study": {"name": name, "out_dir": str(out_dir), "n_trials": 6, "concurrency": 2, "seed": 0},
        "model": {"checkpoint": str(inputs["checkpoint"]), "train_if_missing": False},
        "data": {"corpus": str(inputs["corpus"]), "cache_dir": str(inputs["cache"]), "synthesize_if_missing": False},
        "space": {"granularity": "stage", "bits": [1, 2, 4, 8]},
        "msft": {"total_steps": 4, "batch_size": 16},
        "seeds": {"uniform": True, "allocator_fractions": []},
        "early_stop": {"enabled": False},
    }
    for key, values in sections.items():
        raw.setdefault(key, {}).update(values)
    return raw


def _toml_value(value: object) -> str:
    import json

    if isinstance(value, dict):
        return "{ " + ", ".join(f"{json.dumps(str(k))} = {_toml_value(v)}" for k, v in value.items()) + " }"
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(value)


def to_toml(raw: dict) -> str:
    """A study config dict as TOML text (sections of scalars, lists and inline tables), for tests that
    drive `lsv` by file."""
    lines = []
    for section, values in raw.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in values.items()]
    return "\n".join(lines) + "\n"


def at_once(calls: list[Callable[[], object]], timeout_s: float = 120) -> list[str]:
    """Each call in its own process, all released at the same moment; per call "ok" or its error.

    The processes are forked from this one, so whatever the test imported is there already and they reach
    the starting line together (spawned interpreters would arrive seconds apart and never collide).
    """
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    barrier, results = ctx.Barrier(len(calls)), ctx.Queue()

    def run(i: int, call: Callable[[], object]) -> None:
        barrier.wait()
        try:
            call()
            results.put((i, "ok"))
        except Exception as err:  # noqa: BLE001 - the test reports what went wrong
            results.put((i, f"{type(err).__name__}: {err}"))

    procs = [ctx.Process(target=run, args=(i, call)) for i, call in enumerate(calls)]
    for p in procs:
        p.start()
    got = dict(results.get(timeout=timeout_s) for _ in procs)
    for p in procs:
        p.join(timeout=timeout_s)
    return [got[i] for i in range(len(calls))]


def kill_ray_processes(pattern: str) -> list[int]:
    """SIGKILL the Ray processes whose command line matches ``pattern`` (a regex), and their descendants.

    ``ray stop`` would kill every Ray process on the machine, a user's running studies included; tests
    stop only the cluster they started, named by its GCS port or its session folder. Returns the pids.
    """
    import re

    rx = re.compile(pattern)
    parents: dict[int, int] = {}
    matched: set[int] = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if rx.search(cmdline):
            matched.add(int(entry.name))
    matched.discard(os.getpid())
    doomed = set(matched)
    grew = True
    while grew:  # agents and workers carry no address in their (renamed) command lines: take children too
        grew = False
        for pid, ppid in parents.items():
            if ppid in doomed and pid not in doomed:
                doomed.add(pid)
                grew = True
    sigkill(doomed)
    return sorted(doomed)


def sigkill(pids: Iterable[int]) -> None:
    """SIGKILL each of ``pids``; one that is already gone is not an error."""
    import signal

    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture(scope="session")
def postgres():
    """A throwaway PostgreSQL on 127.0.0.1 for the whole session (tests.services.Postgres)."""
    from tests.services import Postgres, postgres_available

    why = postgres_available()
    if why is not None:
        pytest.skip(why)
    server = Postgres().start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def mlflow_server():
    """A real `mlflow server` with served artifacts on 127.0.0.1 for the whole session."""
    from tests.services import MlflowServer

    server = MlflowServer().start()
    yield server
    server.stop()


def spawn_driver(args: list[str], log: Path, prefix: list[str] | None = None) -> subprocess.Popen:
    """`lsv ARGS` as a user's driver process (its own session, so a test can signal or kill its group),
    stderr into ``log``."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "RAY_AUTH_MODE": "disabled"}
    return subprocess.Popen([*(prefix or []), sys.executable, "-m", "search.cli", *args], cwd=root, env=env,
                            stdout=subprocess.DEVNULL, stderr=log.open("w"), start_new_session=True)


@pytest.fixture(scope="session")
def browse_study(tiny_study_inputs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A finished 8-trial study run by `run_study` as `lsv run` does (control included), with
    ``study.report_every = 4``, for the browsing tests (tests/test_browse.py, tests/test_real_clients.py).

    While the study runs, after its 6th finished trial, the parent run's ``front.json`` is read back from
    MLflow (waiting up to 2 minutes for the tracking thread): ``mid_study_front`` is what a user saw then."""
    import json
    import time

    from mlflow import MlflowClient

    from search.config import parse_study_config
    from search.results.tracking import StudyTracker
    from search.study.run import run_study

    root = tmp_path_factory.mktemp("browse_study")
    raw = study_raw_config(tiny_study_inputs, root, name="browse", study={"n_trials": 8, "report_every": 4})
    config = parse_study_config(raw)
    seen: dict = {}

    def on_status(st) -> None:
        if seen or st.n_complete + st.n_failed + st.n_pruned < 6:
            return
        tracker = StudyTracker(config.mlflow_uri, "browse")
        client = MlflowClient(config.mlflow_uri)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if "front.json" in {a.path for a in client.list_artifacts(tracker.parent_run_id)}:
                local = client.download_artifacts(tracker.parent_run_id, "front.json", str(root))
                seen["mid_study_front"] = json.loads(Path(local).read_text())
                return
            time.sleep(1)
        seen["mid_study_front"] = None

    result = run_study(config, progress=False, on_status=on_status)
    toml = root / "browse.toml"
    toml.write_text(to_toml(raw))
    return {"config": config, "toml": toml, "root": root, "status": result.status, **seen}
