"""Ray addresses that are not a Ray cluster, for every command that takes one (`lsv run`, `lsv verify`) and every
place an address comes from (``--address``, ``storage.ray_address``, ``RAY_ADDRESS``): refused within 30 s with exit
2 and a message naming the address and what is wanted, no traceback, nothing written, no Ray started.

The listeners are real servers on 127.0.0.1 started by the tests: an HTTP server, a TCP server that never says
a word, one that hangs up at once. A real Ray GCS (a local Ray started here) passes the same probe. A bad Ray
node found by the per-node check also leaves nothing behind (the check runs before the study is created).
"""

from __future__ import annotations

import http.server
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

# Imported at collection: Ray's log handler binds sys.stderr when Ray is first imported, and a test's capsys
# stream (where `refused` would import it) is closed after that test, so a later ray.init could not log.
import ray

from search.study.preflight import check_ray_address
from tests.test_bad_input import _ray_pids, _write_study, refused

COMMANDS = ["run", "verify"]


class _Listener:
    """A TCP server on 127.0.0.1 that is not Ray; ``answer(conn)`` handles each connection."""

    def __init__(self, answer: Callable[[socket.socket], None]) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.address = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.answer = answer
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)
            self.answer(conn)

    def close(self) -> None:
        self.sock.close()
        for c in self.conns:
            c.close()


def _silent(conn: socket.socket) -> None:
    return None  # keeps the connection open and says nothing (a port a firewall swallows, a stuck service)


def _hang_up(conn: socket.socket) -> None:
    conn.close()


def _http_status(conn: socket.socket) -> None:
    conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")


@pytest.fixture
def http_server() -> Iterator[str]:
    """A real ``http.server`` on 127.0.0.1 (what an address with the dashboard's or a web app's port reaches)."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


LISTENERS = {"silent": (_silent, "it sent nothing"), "hangs-up": (_hang_up, "it sent nothing"),
             "http-400": (_http_status, "HTTP/1.1 400")}


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("kind", sorted(LISTENERS))
def test_non_ray_listener_is_refused_within_30s(kind: str, command: str, tiny_study_inputs: dict[str, Path],
                                                tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    answer, said = LISTENERS[kind]
    listener = _Listener(answer)
    try:
        toml = _write_study(tiny_study_inputs, tmp_path)
        t0 = time.monotonic()
        refused([command, str(toml), "--address", listener.address], capsys, tmp_path, "--address",
                f"something listens at {listener.address} but it is not a Ray cluster", said,
                skip=(tiny_study_inputs["cache"],))
        assert time.monotonic() - t0 < 30
    finally:
        listener.close()
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("command", COMMANDS)
def test_http_server_address_is_refused(command: str, http_server: str, tiny_study_inputs: dict[str, Path],
                                        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    toml = _write_study(tiny_study_inputs, tmp_path)
    t0 = time.monotonic()
    refused([command, str(toml), "--address", http_server], capsys, tmp_path, http_server, "not a Ray cluster",
            "<!DOCTYPE HTML>", skip=(tiny_study_inputs["cache"],))
    assert time.monotonic() - t0 < 30


BAD_FORMS = {
    "ray-client": ("ray://127.0.0.1:10001", ("Ray Client address", "does not support", "HOST:PORT")),
    "http-url": ("http://127.0.0.1:8265", ("is not HOST:PORT",)),
    "no-port": ("127.0.0.1", ("is not HOST:PORT",)),
    "port-range": ("127.0.0.1:70000", ("is not HOST:PORT",)),
    "nothing-there": ("127.0.0.1:1", ("no Ray cluster answers at 127.0.0.1:1",)),
}


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("form", sorted(BAD_FORMS))
def test_address_forms(form: str, command: str, tiny_study_inputs: dict[str, Path], tmp_path: Path,
                       capsys: pytest.CaptureFixture[str]) -> None:
    address, expected = BAD_FORMS[form]
    toml = _write_study(tiny_study_inputs, tmp_path)
    refused([command, str(toml), "--address", address], capsys, tmp_path, "--address", *expected,
            skip=(tiny_study_inputs["cache"],))


@pytest.mark.parametrize("command", COMMANDS)
def test_address_from_config_and_environment(command: str, http_server: str, tiny_study_inputs: dict[str, Path],
                                             tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    skip = (tiny_study_inputs["cache"],)
    toml = _write_study(tiny_study_inputs, tmp_path, storage={"ray_address": "ray://head:10001"})
    refused([command, str(toml)], capsys, tmp_path, "storage.ray_address", "Ray Client", skip=skip)
    toml = _write_study(tiny_study_inputs, tmp_path)
    monkeypatch.setenv("RAY_ADDRESS", http_server)
    refused([command, str(toml)], capsys, tmp_path, "RAY_ADDRESS", http_server, "not a Ray cluster", skip=skip)
    # "auto" is resolved the way ray.init resolves it (here: RAY_ADDRESS) and that address is probed.
    refused([command, str(toml), "--address", "auto"], capsys, tmp_path, http_server, "not a Ray cluster", skip=skip)


def test_a_real_ray_gcs_passes_the_probe() -> None:
    """The probe's other side: a real Ray GCS answers like one (and the probe is quick)."""
    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        gcs = ray.get_runtime_context().gcs_address
        t0 = time.monotonic()
        assert check_ray_address(gcs) == []
        assert time.monotonic() - t0 < 2
    finally:
        ray.shutdown()


def test_failed_node_check_leaves_nothing_behind(tiny_study_inputs: dict[str, Path], tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """Trials that want a GPU on a Ray whose nodes have no CUDA: the per-node check names the node before the study
    exists, so no optuna.db, mlflow.db, study.json or codebooks are left to make the next run (with `gpu` fixed)
    look like "a different config". Ray was started for the check and is shut down again."""
    skip = (tiny_study_inputs["cache"],)
    toml = _write_study(tiny_study_inputs, tmp_path, resources={"gpu": 1})
    before, rays = _tree_names(tmp_path, skip), _ray_pids()
    capsys.readouterr()
    from search.cli import main

    status = main(["run", str(toml)])
    text = " ".join(capsys.readouterr().err.split())
    assert status == 2, text[-2000:]
    assert "found before starting the trials" in text and "no CUDA device" in text and "node " in text
    assert "Traceback" not in text
    assert _tree_names(tmp_path, skip) == before and not (tmp_path / "runs").exists()
    assert not ray.is_initialized()
    deadline = time.monotonic() + 30
    while not _ray_pids() <= rays and time.monotonic() < deadline:  # ray.shutdown stops them asynchronously
        time.sleep(0.2)
    assert _ray_pids() <= rays, "Ray was left running"
    refused(["status", str(toml)], capsys, tmp_path, "has not been run yet", skip=skip)


def _tree_names(root: Path, skip: tuple[Path, ...]) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if not any(p == s or s in p.parents for s in skip)}


def test_study_run_by_another_driver_is_refused_before_ray(tiny_study_inputs: dict[str, Path], tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    """The node check now runs before the lease is taken, so a live driver's lease is read first: a second `lsv
    run` is refused naming it, with no Ray started and nothing written."""
    import os
    import socket

    import optuna

    from search.cluster.lease import LEASE_ATTR

    toml = _write_study(tiny_study_inputs, tmp_path)
    db = tmp_path / "runs" / "bad" / "optuna.db"
    db.parent.mkdir(parents=True)
    study = optuna.create_study(study_name="bad", storage=f"sqlite:///{db}", directions=["minimize", "minimize"])
    now = time.time()
    live = os.getppid()  # a live process on this host that is not the one asking
    study.set_user_attr(LEASE_ATTR, {"token": "first", "host": socket.gethostname(), "pid": live, "since": now,
                                     "heartbeat": now})
    refused(["run", str(toml)], capsys, tmp_path, "another driver", f"pid {live}", skip=(tiny_study_inputs["cache"],))
