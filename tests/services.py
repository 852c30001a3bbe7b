"""Real services for the cluster tests, started by the tests on 127.0.0.1 and stopped by them.

* :class:`Postgres`: a throwaway PostgreSQL 15 cluster (Debian's binaries; CI installs them), made with
  ``initdb`` in a temporary folder owned by the unprivileged ``postgres`` user (initdb refuses root),
  listening on 127.0.0.1 and a free port, with a password-protected role and database for a study.
* :class:`MlflowServer`: a real ``mlflow server`` with its own SQLite backend store and an artifact root
  it serves (``--serve-artifacts``), so clients upload and download artifacts through HTTP, with no
  shared disk. It runs in its own process group (it starts job-runner processes too), killed whole.
  Given a study's ``backend_store_uri`` it is the MLflow UI a user opens on that study.
* :class:`OptunaDashboard`: ``optuna-dashboard`` (PyPI) over a study's Optuna storage, and
  :func:`chromium_page`: a page as headless Chromium renders it (its DOM, or a screenshot).
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

PG_BIN = Path("/usr/lib/postgresql/15/bin")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def postgres_available() -> str | None:
    """None when a throwaway PostgreSQL can be made here, else why not."""
    if not (PG_BIN / "initdb").exists():
        return f"PostgreSQL 15 is not installed ({PG_BIN}; Debian: apt-get install -y postgresql)"
    if os.geteuid() != 0:
        return "needs root to run initdb as the postgres user"
    try:
        import pwd

        pwd.getpwnam("postgres")
    except KeyError:
        return "no 'postgres' user"
    return None


class Postgres:
    """A throwaway PostgreSQL; ``url(db)`` gives ``postgresql://lsv:<password>@127.0.0.1:<port>/<db>``."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="lsv-pg-"))
        self.port = free_port()
        self.password = "pw-" + secrets.token_hex(8)  # tests grep every written file for it
        self._admin_password = secrets.token_hex(8)

    def _as_postgres(self, *cmd: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(["runuser", "-u", "postgres", "--", *cmd], capture_output=True, text=True,
                              env={**os.environ, **(env or {})}, check=False, timeout=120)

    def start(self) -> Postgres:
        import pwd

        pg = pwd.getpwnam("postgres")
        os.chown(self.root, pg.pw_uid, pg.pw_gid)
        pwfile = self.root / "admin.pw"
        pwfile.write_text(self._admin_password + "\n")
        os.chown(pwfile, pg.pw_uid, pg.pw_gid)
        out = self._as_postgres(str(PG_BIN / "initdb"), "-D", str(self.root / "data"), "-A", "scram-sha-256",
                                "--pwfile", str(pwfile), "-U", "postgres")
        if out.returncode != 0:
            raise RuntimeError(f"initdb failed: {out.stderr[-2000:]}")
        opts = f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.root}"
        out = self._as_postgres(str(PG_BIN / "pg_ctl"), "-D", str(self.root / "data"), "-o", opts,
                                "-l", str(self.root / "server.log"), "-w", "start")
        if out.returncode != 0:
            raise RuntimeError(f"pg_ctl start failed: {out.stderr[-2000:]} {self._log()}")
        return self

    def _log(self) -> str:
        log = self.root / "server.log"
        return log.read_text()[-2000:] if log.exists() else ""

    def create_database(self, name: str) -> str:
        """A database owned by role ``lsv`` (created on first use); returns its URL with the password."""
        psql = [str(PG_BIN / "psql"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "-v",
                "ON_ERROR_STOP=1"]
        env = {"PGPASSWORD": self._admin_password}
        exists = self._as_postgres(*psql, "-tAc", "SELECT 1 FROM pg_roles WHERE rolname='lsv'", env=env)
        cmds = [] if exists.stdout.strip() == "1" else [f"CREATE ROLE lsv LOGIN PASSWORD '{self.password}'"]
        cmds.append(f"CREATE DATABASE {name} OWNER lsv")
        for sql in cmds:
            out = self._as_postgres(*psql, "-c", sql, env=env)
            if out.returncode != 0:
                raise RuntimeError(f"psql {sql!r} failed: {out.stderr}")
        return self.url(name)

    def alter_password(self, password: str) -> None:
        """Give role ``lsv`` another password (e.g. one that needs percent-encoding in a URL)."""
        psql = [str(PG_BIN / "psql"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "-v",
                "ON_ERROR_STOP=1"]
        sql = "ALTER ROLE lsv PASSWORD '{}'".format(password.replace("'", "''"))
        out = self._as_postgres(*psql, "-c", sql, env={"PGPASSWORD": self._admin_password})
        if out.returncode != 0:
            raise RuntimeError(f"psql ALTER ROLE failed: {out.stderr}")
        self.password = password

    def url(self, db: str, *, password: bool = True) -> str:
        auth = f"lsv:{self.password}" if password else "lsv"
        return f"postgresql://{auth}@127.0.0.1:{self.port}/{db}"

    def stop(self) -> None:
        self._as_postgres(str(PG_BIN / "pg_ctl"), "-D", str(self.root / "data"), "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.root, ignore_errors=True)


class MlflowServer:
    """``mlflow server`` on 127.0.0.1 with served artifacts; ``uri`` is ``http://127.0.0.1:<port>``."""

    def __init__(self, backend_store_uri: str | None = None) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="lsv-mlflow-"))
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.backend_store_uri = backend_store_uri or f"sqlite:///{self.root / 'mlflow.db'}"

    def start(self, timeout_s: float = 180.0) -> MlflowServer:
        # /health answers after 13-50 s on a loaded 2-core machine (NOTES.md): poll, don't sleep.
        mlflow = Path(sys.executable).parent / "mlflow"
        cmd = [str(mlflow), "server", "--host", "127.0.0.1", "--port", str(self.port),
               "--backend-store-uri", self.backend_store_uri, "--serve-artifacts",
               "--artifacts-destination", str(self.root / "artifacts"), "--workers", "1"]
        self.log = open(self.root / "server.log", "a")  # noqa: SIM115 - closed in kill()
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
                                     cwd=self.root)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {(self.root / 'server.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(self.uri + "/health", timeout=2):
                    return self
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"mlflow server did not answer /health within {timeout_s} s")

    def pause(self) -> None:
        """Stop answering (SIGSTOP to the whole group) until :meth:`resume`: an unreachable server."""
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGCONT)

    def kill(self) -> None:
        """The server goes away (its stores stay): clients get connection errors until :meth:`start`."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGCONT)
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(timeout=30)
        if hasattr(self, "log"):
            self.log.close()

    def stop(self) -> None:
        self.kill()
        shutil.rmtree(self.root, ignore_errors=True)


class OptunaDashboard:
    """``optuna-dashboard STORAGE`` on 127.0.0.1; ``get(path)`` reads its JSON API (``/api/studies``, ...)."""

    def __init__(self, storage_url: str) -> None:
        self.storage_url = storage_url
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 120.0) -> OptunaDashboard:
        exe = Path(sys.executable).parent / "optuna-dashboard"
        if not exe.exists():
            raise RuntimeError(f"{exe} is missing: install the dev extras (pip install -e '.[dev]'; make install)")
        self.log = open(Path(tempfile.mkdtemp(prefix="lsv-optuna-dashboard-")) / "server.log", "a")  # noqa: SIM115
        self.proc = subprocess.Popen([str(exe), self.storage_url, "--host", "127.0.0.1", "--port", str(self.port)],
                                     stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"optuna-dashboard exited: {Path(self.log.name).read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(self.uri + "/api/studies", timeout=5):
                    return self
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"optuna-dashboard did not answer /api/studies within {timeout_s} s")

    def get(self, path: str) -> dict:
        import json

        with urllib.request.urlopen(self.uri + path, timeout=60) as response:
            return json.loads(response.read())

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        if hasattr(self, "log"):
            self.log.close()
            shutil.rmtree(Path(self.log.name).parent, ignore_errors=True)


CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")


def chromium() -> str:
    """The headless browser's path; a clear error where there is none (CI installs Debian's ``chromium``)."""
    found = next((shutil.which(n) for n in CHROMIUM_NAMES if shutil.which(n)), None)
    if found is None:
        raise RuntimeError("no chromium on PATH (tried " + ", ".join(CHROMIUM_NAMES) + "); install it: "
                           "apt-get install -y chromium (.ci/run does)")
    return found


def chromium_page(url: str, *, screenshot: Path | None = None, size: tuple[int, int] = (1400, 1000),
                  budget_ms: int = 20000, timeout_s: float = 240.0) -> str:
    """The page at ``url`` as headless Chromium renders it: its DOM after ``budget_ms`` of virtual time (a JS
    app like the MLflow UI draws nothing before its scripts ran and fetched: under 15 s it dumps an empty
    shell, NOTES.md), or, with ``screenshot``, a PNG there (then returns ""). A fresh profile each call, so
    no column choice or panel state of an earlier visit leaks in."""
    profile = Path(tempfile.mkdtemp(prefix="lsv-chromium-"))
    flags = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--no-first-run", "--hide-scrollbars", f"--user-data-dir={profile}",
             f"--virtual-time-budget={budget_ms}", f"--window-size={size[0]},{size[1]}"]
    what = [f"--screenshot={screenshot}"] if screenshot is not None else ["--dump-dom"]
    try:
        run = subprocess.run([*flags, *what, url], capture_output=True, text=True, timeout=timeout_s)
    finally:
        shutil.rmtree(profile, ignore_errors=True)
    if run.returncode != 0 or (screenshot is not None and not screenshot.exists()):
        raise RuntimeError(f"chromium failed on {url} (exit {run.returncode}): {run.stderr[-2000:]}")
    return run.stdout


def unshare_available() -> str | None:
    """None when a process can get its own mount namespace here (root and unshare), else why not."""
    if shutil.which("unshare") is None:
        return "no unshare (util-linux)"
    probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "true"], capture_output=True,
                           text=True, check=False)
    return None if probe.returncode == 0 else f"unshare --mount is not permitted here: {probe.stderr.strip()}"


class RayCluster:
    """A two-node Ray cluster on 127.0.0.1: a head node (``ray start --head``) and a worker node whose
    processes run in their own mount namespace with each of ``hidden`` covered by an empty tmpfs, so it
    sees a different filesystem than the driver (no shared study folder, or no data)."""

    def __init__(self, hidden: list[Path], port: int | None = None, head_cpus: int = 1, worker_cpus: int = 1) -> None:
        self.port = port or free_port()
        self.head_cpus, self.worker_cpus = head_cpus, worker_cpus
        self.address = f"127.0.0.1:{self.port}"
        self.hidden = hidden
        self.env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
        self.worker: subprocess.Popen | None = None
        self.ray = str(Path(sys.executable).parent / "ray")

    def start(self, timeout_s: float = 120.0) -> RayCluster:
        subprocess.run([self.ray, "start", "--head", "--port", str(self.port), "--num-cpus", str(self.head_cpus),
                        "--node-ip-address", "127.0.0.1", "--include-dashboard", "false"], env=self.env,
                       check=True, capture_output=True, timeout=timeout_s)
        mounts = " && ".join(f"mount -t tmpfs none {p}" for p in self.hidden) or "true"
        worker = (f"{mounts} && exec {self.ray} start --address {self.address} --num-cpus {self.worker_cpus} "
                  "--node-ip-address 127.0.0.1 --block")
        self.worker = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "bash", "-c", worker],
                                       env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                       start_new_session=True)
        return self

    def kill_worker_node(self) -> int:
        """SIGKILL every process of the worker node (all processes in its mount namespace): a node lost."""
        assert self.worker is not None
        ns = os.readlink(f"/proc/{self.worker.pid}/ns/mnt")
        victims = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    if os.readlink(entry / "ns" / "mnt") == ns:
                        victims.append(int(entry.name))
                except OSError:
                    continue
        from tests.conftest import sigkill

        sigkill(victims)
        return len(victims)

    def stop(self) -> None:
        from tests.conftest import kill_ray_processes

        if self.worker is not None and self.worker.poll() is None:
            try:
                os.killpg(self.worker.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        kill_ray_processes(rf"[:=]{self.port}(?!\d)")  # this cluster only, never `ray stop` (all of Ray)
        bootstrap = Path("/tmp/ray/ray_current_cluster")
        if bootstrap.exists() and f":{self.port}" in bootstrap.read_text():
            bootstrap.unlink()


class RayHead:
    """A one-node Ray cluster on 127.0.0.1 (``ray start --head``) with declared resources: ``gpus`` makes Ray
    hand out GPU ids (``ray.get_gpu_ids()``, ``CUDA_VISIBLE_DEVICES``) on a machine without one, a fake GPU
    for placement tests. Stopped by its port (never ``ray stop``: that would stop every Ray here)."""

    def __init__(self, cpus: int = 2, gpus: int = 0) -> None:
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.cpus, self.gpus = cpus, gpus
        self.env = {**os.environ, "RAY_AUTH_MODE": "disabled"}

    def start(self, timeout_s: float = 120.0) -> RayHead:
        ray = str(Path(sys.executable).parent / "ray")
        subprocess.run([ray, "start", "--head", "--port", str(self.port), "--num-cpus", str(self.cpus),
                        "--num-gpus", str(self.gpus), "--node-ip-address", "127.0.0.1", "--include-dashboard",
                        "false"], env=self.env, check=True, capture_output=True, timeout=timeout_s)
        return self

    def stop(self) -> None:
        from tests.conftest import kill_ray_processes

        kill_ray_processes(rf"[:=]{self.port}(?!\d)")
        bootstrap = Path("/tmp/ray/ray_current_cluster")
        if bootstrap.exists() and f":{self.port}" in bootstrap.read_text():
            bootstrap.unlink()
