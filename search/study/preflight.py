"""Everything about a study that can be checked without training, checked before anything is written.

:func:`preflight_study` reads the config's storage, data, checkpoint, search space and budget, and
collects every problem it finds (with the field, file and line) instead of stopping at the first, then
raises one :class:`PreflightFailed` (``lsv run`` exits 2) before the study folder, the Optuna study, the
MLflow experiment or Ray exist. What it loaded (the baseline, the space, the data listings) is handed
back in a :class:`Preflight`, so the run does not read it twice. Two things are not errors but planned
work, and only for the quickstart's own default paths: synthesizing the embedded corpus and training
the default baseline (``synthesize_if_missing`` / ``train_if_missing``); a path the user typed that does
not exist is an error, never a reason for minutes of unasked-for work.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from lsv_core.errors import LsvError

if TYPE_CHECKING:
    from collections.abc import Sequence

    from lsv_core.data.manifest import DataSet
    from lsv_core.data.subset import TrainingSubset
    from lsv_core.data.trials import Trials
    from lsv_core.models.baseline import Baseline
    from lsv_core.workbench import DataPaths
    from search.config import StudyConfig
    from search.space import SearchSpace

__all__ = ["Listings", "Preflight", "PreflightFailed", "Problem", "check_architecture", "check_data", "check_device",
           "check_folders", "check_model", "check_outputs", "check_ray_address", "preflight_study"]

RAY_CONNECT_TIMEOUT_S = 10.0
ADDRESS_FIELDS = "--address / storage.ray_address / RAY_ADDRESS"  # where a Ray address can come from


@dataclass(frozen=True)
class Problem:
    """One thing wrong: ``where`` is a config field (``data.corpus``), a file (``trials:12``) or a node."""

    where: str
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


class PreflightFailed(LsvError):
    """The study cannot start; every problem found is listed (nothing was written, Ray was not started)."""

    def __init__(self, problems: list[Problem], what: str = "the study") -> None:
        self.problems = problems
        lines = [f"{len(problems)} problem(s) found before starting {what}; nothing was written:"]
        lines += [f"  - {p}" for p in problems]
        super().__init__("\n".join(lines))


@dataclass
class Preflight:
    """What the preflight read, for the run to reuse; ``plan`` lists work about to be done (corpus, baseline)."""

    baseline: Baseline | None = None
    space: SearchSpace | None = None
    train: DataSet | None = None
    eval: DataSet | None = None
    trials: Trials | None = None
    plan: list[str] = field(default_factory=list)
    synthesize_corpus: bool = False
    train_baseline: bool = False
    excluded_nodes: list[str] = field(default_factory=list)  # Ray nodes left out (resources.bad_nodes)


# -- the checks -----------------------------------------------------------------------------------------------
def preflight_study(config: StudyConfig, *, address: str | None = None) -> Preflight:
    """Check ``config`` as completely as possible without training; raise :class:`PreflightFailed` listing all
    problems, or return what was loaded. ``address`` is the Ray address the run will use (if any)."""
    problems: list[Problem] = []
    out = Preflight()
    _check_out_dir(config, problems)
    _check_storage(config, problems)
    if address:
        problems += check_ray_address(address, where=ADDRESS_FIELDS)
    cache_ok = not any(p.where == "data.cache_dir" for p in problems)
    data_ready = _check_data(config, out, problems, cache_ok)
    _check_baseline(config, out, problems, data_ready)
    if problems:
        raise PreflightFailed(problems)
    return out


def check_ray_address(address: str, *, where: str = "address", timeout_s: float = RAY_CONNECT_TIMEOUT_S) -> list[Problem]:
    """A Ray cluster's GCS address ``host:port`` that answers like Ray within ``timeout_s`` in all.

    ``ray.init`` retries an address that accepts TCP but is not Ray for ever, so the address is probed
    first: Ray's GCS is a gRPC server, which answers an HTTP/2 connection preface with a SETTINGS frame;
    a web server, a database or a silent port does not. ``ray://`` (Ray Client) is refused: the driver
    must run where it can join the cluster (a node, or a machine that reaches the GCS port). ``auto``
    is the cluster ``ray start`` last started on this machine; ``local`` a private one.
    """
    if address == "local":
        return []
    if address == "auto":
        resolved = _auto_address()
        if resolved is None:
            return [Problem(where, "'auto' finds no Ray cluster started on this machine (`ray start --head`); "
                                   "give its address HOST:PORT, or none for a private local Ray")]
        address = resolved
    if address.startswith("ray://"):
        return [Problem(where, f"{address!r} is a Ray Client address, which lsv does not support (a study's driver "
                               "joins the cluster itself; run it on a node or a machine that reaches the head): "
                               "give the head's GCS address HOST:PORT (`ray start --head --port 6379`), e.g. "
                               "10.0.0.1:6379")]
    host, _, port = address.rpartition(":")
    if "://" in address or not host or not port.isdigit() or not 0 < int(port) < 65536:
        return [Problem(where, f"{address!r} is not HOST:PORT (e.g. 10.0.0.1:6379)")]
    t0 = time.monotonic()
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s) as sock:
            if os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true"):  # a TLS GCS: no plain HTTP/2 to probe
                return []
            answer = _http2_answer(sock, max(1.0, timeout_s - (time.monotonic() - t0)))
    except OSError as err:
        return [Problem(where, f"no Ray cluster answers at {address} ({err.strerror or err}, after "
                               f"{time.monotonic() - t0:.1f} s); start it with `ray start --head --port {port}` "
                               "or fix the address")]
    if len(answer) >= 9 and answer[3] == _HTTP2_SETTINGS and answer[5:9] == bytes(4):  # on stream 0
        return []
    got = f"it answered {answer[:24]!r}" if answer else f"it sent nothing in {time.monotonic() - t0:.1f} s"
    return [Problem(where, f"something listens at {address} but it is not a Ray cluster ({got}; Ray's GCS speaks "
                           "gRPC): give the port `ray start --head --port` was given (default 6379)")]


# An HTTP/2 client connection preface and an empty SETTINGS frame (RFC 9113, 3.4 and 6.5).
_HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])
_HTTP2_SETTINGS = 4


def _http2_answer(sock: socket.socket, timeout_s: float) -> bytes:
    """The first bytes a server sends back after an HTTP/2 preface (at most 64, within ``timeout_s``)."""
    deadline = time.monotonic() + timeout_s
    data = b""
    try:
        sock.sendall(_HTTP2_PREFACE)
        while len(data) < 9 and (left := deadline - time.monotonic()) > 0:
            sock.settimeout(left)
            chunk = sock.recv(64)
            if not chunk:
                break
            data += chunk
    except (TimeoutError, ConnectionError):
        pass
    return data


def _auto_address() -> str | None:
    """The address ``ray.init(address="auto")`` would use (the cluster ``ray start`` last left here), if any."""
    try:
        from ray._private.services import canonicalize_bootstrap_address  # how ray.init resolves "auto"

        return canonicalize_bootstrap_address("auto")
    except Exception:  # noqa: BLE001 - ConnectionError when none runs; anything else: nothing to probe
        return None


def _nearest_existing(path: Path) -> Path:
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _check_writable_dir(path: Path, where: str, problems: list[Problem]) -> bool:
    """Whether ``path`` is a folder that exists or can be made and written; if not, a problem naming ``where``."""
    if path.exists() and not path.is_dir():
        problems.append(Problem(where, f"{path} exists and is not a folder"))
        return False
    base = _nearest_existing(path)
    if not base.is_dir():
        problems.append(Problem(where, f"cannot create {path}: {base} is a file, not a folder"))
        return False
    if not os.access(base, os.W_OK | os.X_OK):
        problems.append(Problem(where, f"cannot create or write {path} ({base} is not writable)"))
        return False
    return True


def check_folders(folders: dict[str, Path | None], problems: list[Problem]) -> dict[str, Path | None]:
    """Folders a command will create or write (``--out DIR``, ``--cache``), by flag: each must be a folder or
    creatable under a writable folder (not under a file). Returns them with the unusable ones set to None,
    so later checks (e.g. audits that remember files in ``--cache``) do not write there."""
    return {flag: path if path is None or _check_writable_dir(Path(path), flag, problems) else None
            for flag, path in folders.items()}


def _check_out_dir(config: StudyConfig, problems: list[Problem]) -> None:
    _check_writable_dir(config.study_dir, "study.out_dir", problems)
    _check_writable_dir(config.data.cache_dir.resolve(), "data.cache_dir", problems)
    ray_storage = config.storage.ray_storage
    if ray_storage and "://" not in ray_storage:  # a local (or shared) path; s3:// and the like are Ray's to check
        _check_writable_dir(Path(ray_storage).expanduser().resolve(), "storage.ray_storage", problems)


def _check_storage(config: StudyConfig, problems: list[Problem]) -> None:
    from search.cluster.storage import check_mlflow_uri, check_optuna_url

    problems += [Problem("storage.optuna", m) for m in check_optuna_url(config.optuna_url, config.study_dir)]
    problems += [Problem("storage.mlflow", m) for m in check_mlflow_uri(config.mlflow_uri, config.study_dir)]


def _check_data(config: StudyConfig, out: Preflight, problems: list[Problem], cache_ok: bool = True) -> bool:
    """Listings, trial list and every audio file (files that passed are remembered in ``data.cache_dir`` when
    ``cache_ok``); returns whether the data is there to be checked."""
    from search.config import DEFAULT_CORPUS

    d = config.data
    paths = config.data_paths()
    if d.train is None and d.corpus is not None and d.corpus.exists() and not d.corpus.is_dir():
        problems.append(Problem("data.corpus", f"{d.corpus} is a file; give the corpus folder (holding train/, "
                                "eval/ and eval/trials)"))
        return False
    if d.train is None and d.corpus is not None and not (d.corpus / "corpus.json").is_file():
        if d.corpus.exists() and any(d.corpus.iterdir()):
            problems.append(Problem("data.corpus", f"{d.corpus} is not a finished corpus (no corpus.json); remove it "
                                    "or run `lsv corpus synth --out DIR --force`"))
        elif d.synthesize_if_missing and d.corpus == DEFAULT_CORPUS:
            out.synthesize_corpus = True
            out.plan.append(f"synthesize the embedded corpus into {d.corpus} (4,000 utterances of 200 speakers, "
                            "about 20-30 s on 2 cores)")
        else:
            why = ("synthesize_if_missing makes the embedded corpus only at its default path "
                   f"{DEFAULT_CORPUS}" if d.synthesize_if_missing else "synthesize_if_missing is false")
            problems.append(Problem("data.corpus", f"{d.corpus} does not exist ({why})"))
        return False
    fields = (("data.train", "data.eval", "data.trials") if d.train is not None else ("data.corpus",) * 3)
    listings = check_data(paths, problems, fields=fields, cache_dir=config.data.cache_dir if cache_ok else None,
                          train_subset=config.workbench_spec().train_subset)
    out.train, out.eval, out.trials = listings.train, listings.eval, listings.trials
    return out.train is not None and out.eval is not None


@dataclass
class Listings:
    """The data a run reads, as far as it could be read."""

    train: DataSet | None = None
    eval: DataSet | None = None
    trials: Trials | None = None


def check_data(paths: DataPaths, problems: list[Problem], *, fields: tuple[str, str, str],
               cache_dir: Path | None, train_subset: TrainingSubset | None = None, need_train: bool = True) -> Listings:
    """The listings, the trial list and every audio file a run will read (the training subset it fine-tunes
    on and the evaluation utterances the trial list uses; headers only, and files that passed are
    remembered by content in ``cache_dir``). Problems name ``fields`` (train, eval, trials) and file:line."""
    import sys

    from lsv_core.data.audit import audit_audio
    from lsv_core.data.manifest import read_data
    from lsv_core.data.subset import select_training_utts
    from lsv_core.data.trials import read_trials
    from lsv_core.errors import ConfigError, DataError

    out = Listings()
    wanted = [(fields[0], paths.train, "data dir")] if need_train else []
    wanted += [(fields[1], paths.eval, "data dir"), (fields[2], paths.trials, "trial list")]
    missing = False
    for name, path, kind in wanted:
        if not path.exists():
            problems.append(Problem(name, f"{kind} {path} does not exist"))
            missing = True
        elif path.is_dir() != (kind == "data dir"):
            problems.append(Problem(name, f"{path} is a {'folder' if path.is_dir() else 'file'}; give a {kind} "
                                    + ("(a Kaldi data dir or VoxCeleb folder)" if kind == "data dir" else "file")))
            missing = True
    if missing:
        return out
    if need_train:
        try:
            out.train = read_data(paths.train)
        except DataError as err:
            problems.append(Problem(fields[0], str(err)))
    try:
        out.eval = read_data(paths.eval)
    except DataError as err:
        problems.append(Problem(fields[1], str(err)))
    if out.eval is not None:
        try:
            out.trials = read_trials(paths.trials, out.eval)
        except DataError as err:
            problems.append(Problem(fields[2], str(err)))
    used = []
    if out.train is not None:
        try:
            used.append((out.train, select_training_utts(out.train, train_subset) if train_subset else None))
        except ConfigError as err:
            problems.append(Problem("train_speakers", str(err)))
    if out.eval is not None and out.trials is not None:
        used.append((out.eval, out.trials.utterances))
    for data, utts in used:
        found = audit_audio(data, utts=utts, cache_dir=cache_dir, progress=sys.stderr.isatty())
        problems += [Problem(f"{data.root}", str(p)) for p in found]
    return out


def check_outputs(outputs: dict[str, Path | None], force: bool, problems: list[Problem]) -> None:
    """Files a command will write: refused up front when they exist (without ``force``) or cannot be made."""
    for flag, path in outputs.items():
        if path is None:
            continue
        if path.exists() and not force:
            problems.append(Problem(flag, f"{path} exists; pass --force to replace it"))
        elif path.is_dir():
            problems.append(Problem(flag, f"{path} is a folder"))
        else:
            base = _nearest_existing(path.parent)
            if base.exists() and not base.is_dir():
                problems.append(Problem(flag, f"cannot write {path}: {base} is a file, not a folder"))
            elif not base.is_dir() or not os.access(base, os.W_OK | os.X_OK):
                problems.append(Problem(flag, f"cannot write {path} ({base} is not a writable folder)"))


def check_model(checkpoint: Path, arch: str | None, arch_kwargs: dict, problems: list[Problem], *,
                where: str = "--model", need_head: Sequence[str] = ()) -> Baseline | None:
    """Read a baseline checkpoint (ours or a WeSpeaker .pt with ``arch``); None and a problem if it cannot be.

    ``need_head``: what needs the baseline's AAM head (fine-tuning, Hessian traces), in the words of the
    flags or fields that ask for it; empty when nothing does (k-means alone works without the head).
    """
    from lsv_core.errors import LsvError
    from lsv_core.models.baseline import read_baseline

    if not checkpoint.exists():
        problems.append(Problem(where, f"{checkpoint} does not exist"))
        return None
    if checkpoint.is_dir():
        problems.append(Problem(where, f"{checkpoint} is a folder; give the checkpoint file (.safetensors, or a "
                                "WeSpeaker .pt)"))
        return None
    try:
        baseline = read_baseline(checkpoint, arch, arch_kwargs)
    except (LsvError, TypeError) as err:
        problems.append(Problem(where, str(err)))
        return None
    if need_head and not baseline.has_head:
        problems.append(Problem(where, f"{checkpoint} holds no AAM head (projection.*): {', '.join(need_head)} "
                                f"need{'s' if len(need_head) == 1 else ''} the head the baseline was trained with "
                                "(train it with `lsv train`); without a head only k-means with no fine-tuning runs"))
    return baseline


def check_architecture(name: str, kwargs: dict, problems: list[Problem], where: str = "--model") -> None:
    """The model name and its arguments as the registry accepts them (the flag named when they are not)."""
    from lsv_core.errors import ConfigError
    from lsv_core.models.registry import model_arguments

    try:
        model_arguments(name, kwargs)
    except ConfigError as err:
        problems.append(Problem(where, str(err)))


def check_device(device: str, problems: list[Problem], where: str = "--device") -> None:
    from lsv_core.device import pick_device
    from lsv_core.errors import ConfigError

    try:
        pick_device(device)
    except ConfigError as err:
        problems.append(Problem(where, str(err)))


def _check_baseline(config: StudyConfig, out: Preflight, problems: list[Problem], data_ready: bool) -> None:
    from search.config import DEFAULT_CHECKPOINT

    m = config.model
    if not m.checkpoint.exists():
        if m.train_if_missing and m.checkpoint == DEFAULT_CHECKPOINT:
            out.train_baseline = True
            out.plan.append(f"train the default baseline into {m.checkpoint} (900 steps, about 4-5 minutes on 2 "
                            "CPU cores)")
        else:
            why = ("train_if_missing trains only the default baseline at " + str(DEFAULT_CHECKPOINT)
                   if m.train_if_missing else "train_if_missing is false")
            problems.append(Problem("model.checkpoint", f"{m.checkpoint} does not exist ({why})"))
        return
    baseline = check_model(m.checkpoint, m.architecture, m.arch_kwargs, problems, where="model.checkpoint",
                           need_head=head_uses(config))
    if baseline is None:
        return
    out.baseline = baseline
    if baseline.has_head and out.train is not None:
        n_classes = int(baseline.head["weight"].shape[0])
        if n_classes != len(out.train.speakers):
            problems.append(Problem("model.checkpoint", f"the head has {n_classes} classes but the training data "
                                    f"{out.train.root} has {len(out.train.speakers)} speakers; fine-tune on the data "
                                    "the baseline was trained on"))
    check_space(config, out, problems)


def head_uses(config: StudyConfig) -> list[str]:
    """What in a study needs the baseline's AAM head: fine-tuning and anything computed from Hessian traces
    (their loss is the AAM loss). A one-shot study (``msft.total_steps = 0``, no Hessian) needs none."""
    uses = []
    if config.msft.total_steps > 0:
        uses.append(f"fine-tuning (msft.total_steps = {config.msft.total_steps})")
    if config.msft.order == "sensitivity":
        uses.append('the Hessian stage order (msft.order = "sensitivity")')
    if config.seeds.allocator_fractions:
        uses.append(f"the Hessian allocator's seed trials (seeds.allocator_fractions = "
                    f"{config.seeds.allocator_fractions}; [] turns them off)")
    if config.study.sampler == "hessian":
        uses.append('the Hessian prior (study.sampler = "hessian")')
    return uses


def check_space(config: StudyConfig, out: Preflight, problems: list[Problem]) -> None:
    """The search space over the baseline, and the size budget against its smallest recipe."""
    from lsv_core.errors import ConfigError
    from lsv_core.quant import packed_size_bytes
    from search.space import SearchSpace

    assert out.baseline is not None
    try:
        out.space = SearchSpace.build(out.baseline.model, config.space)
    except ConfigError as err:
        problems.append(Problem("space", str(err)))
        return
    budget = config.size_budget_bytes
    if budget is not None:
        smallest = packed_size_bytes(out.baseline.model, out.space.uniform(out.space.choices[0]))
        if smallest > budget:
            problems.append(Problem("objectives.size_budget_mb", f"{config.objectives.size_budget_mb:g} MB "
                                    f"({budget:,} bytes) is below the smallest model of the search space "
                                    f"({smallest:,} bytes: every unit at {out.space.choices[0]} bits, fixed layers "
                                    f"as fixed); raise it to at least {smallest / 1e6:.4f}"))
