"""No secret in any message, file or MLflow field, whatever form a storage URL carries it in: the password of the
user info, a secret query parameter (``?password=``, valid for libpq and SQLAlchemy), percent-encoded or not,
and credentials from the environment (``PGPASSWORD``, ``MLFLOW_TRACKING_PASSWORD``).

Errors are produced for real (a PostgreSQL port nobody listens on, an MLflow server that is not there, configs that
fail validation) through the real CLI; the files and MLflow fields come from a real study on a throwaway
PostgreSQL whose role has a password full of characters that need percent-encoding.
"""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import quote

import pytest

from search.redaction import redacted, scrub, scrub_known, secrets_in
from tests.services import free_port
from tests.test_bad_input import _write_study, refused

SECRET = "s3cr@t:p/w%d+x"  # needs percent-encoding in a URL; '+' decodes to ' ' in a query
ENCODED = quote(SECRET, safe="")


def _forms(secret: str) -> set[str]:
    """The ways the secret could leak: as the server knows it (decoded) and as written in the URL (encoded)."""
    return {secret, quote(secret, safe="")}


def _leaks(text: str, secret: str = SECRET) -> list[str]:
    return [f for f in _forms(secret) if f in text]


URL_FORMS = {
    "userinfo-encoded": f"postgresql://lsv:{ENCODED}@127.0.0.1:PORT/lsv",
    "query-password": f"postgresql://lsv@127.0.0.1:PORT/lsv?password={ENCODED}",
    "query-password-upper-with-others": f"postgresql://lsv@127.0.0.1:PORT/lsv?sslmode=disable&PASSWORD={ENCODED}"
                                        "&connect_timeout=3",
    "query-sslpassword": f"postgresql://lsv@127.0.0.1:PORT/lsv?sslpassword={ENCODED}",
    "mysql-passwd": f"mysql+pymysql://lsv@127.0.0.1:PORT/lsv?passwd={ENCODED}",
}


@pytest.mark.parametrize("form", sorted(URL_FORMS))
def test_redacted_and_scrub_hide_every_form(form: str) -> None:
    url = URL_FORMS[form].replace("PORT", "5432")
    shown = redacted(url)
    assert not _leaks(shown), shown
    assert "***" in shown and "127.0.0.1:5432/lsv" in shown and shown.startswith(url.split("://")[0] + "://lsv")
    if "sslmode" in url:
        assert "sslmode=disable" in shown and "connect_timeout=3" in shown  # other parameters kept as given
    message = f"could not connect with {SECRET!r} ({SECRET}, {ENCODED})"
    assert not _leaks(scrub(message, url)) and set(secrets_in(url)) >= {ENCODED, SECRET}


def test_plus_in_a_query_password() -> None:
    """A raw '+' in a query value is a space to form decoders and a '+' to others: both forms are hidden."""
    url = "postgresql://lsv@h/db?password=ab+cd"
    assert redacted(url) == "postgresql://lsv@h/db?password=***"
    assert scrub("ab+cd / ab cd", url) == "*** / ***"


def test_urls_without_secrets_are_unchanged() -> None:
    for url in ("sqlite:////abs/optuna.db", "sqlite:///rel.db?mode=ro", "postgresql://lsv@h:5432/db?sslmode=require",
                "http://127.0.0.1:5000", "http://[::1]:5000/x?y=1#z"):
        assert redacted(url) == url and secrets_in(url) == []


def test_environment_credentials_are_scrubbed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "mlflow-" + SECRET)
    monkeypatch.setenv("PGPASSWORD", "pg-" + SECRET)
    text = scrub_known(f"auth failed with mlflow-{SECRET} / pg-{SECRET}")
    assert "mlflow-" not in text.replace("mlflow-***", "") and SECRET not in text


@pytest.mark.parametrize("form", sorted(URL_FORMS))
def test_unreachable_optuna_storage_message_has_no_secret(form: str, tiny_study_inputs: dict[str, Path],
                                                          tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = URL_FORMS[form].replace("PORT", str(free_port()))
    toml = _write_study(tiny_study_inputs, tmp_path, storage={"optuna": url})
    text = refused(["run", str(toml)], capsys, tmp_path, "storage.optuna", "***", skip=(tiny_study_inputs["cache"],))
    assert not _leaks(text), text


@pytest.mark.parametrize("which", ["optuna", "mlflow"])
def test_mlflow_database_and_server_urls(which: str, tiny_study_inputs: dict[str, Path], tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    """MLflow's store may be a database URL (checked before anything is written, like Optuna's) or a server."""
    skip = (tiny_study_inputs["cache"],)
    db = f"postgresql://lsv@127.0.0.1:{free_port()}/mlflow?password={ENCODED}"
    toml = _write_study(tiny_study_inputs, tmp_path, storage={which: db})
    text = refused(["run", str(toml)], capsys, tmp_path, f"storage.{which}", "cannot connect", skip=skip)
    assert not _leaks(text), text
    if which == "mlflow":
        server = f"http://lsv:{ENCODED}@127.0.0.1:{free_port()}"
        toml = _write_study(tiny_study_inputs, tmp_path, storage={"mlflow": server})
        text = refused(["run", str(toml)], capsys, tmp_path, "storage.mlflow", "no MLflow server answers", skip=skip)
        assert not _leaks(text), text


@pytest.mark.parametrize("field,url", [
    ("optuna", f"redis://lsv:{ENCODED}@127.0.0.1:6379/0"),
    ("optuna", f"mongodb://127.0.0.1/db?password={ENCODED}"),
    ("mlflow", f"ftp://lsv:{ENCODED}@127.0.0.1/x"),
])
def test_invalid_url_in_config_error_has_no_secret(field: str, url: str, tiny_study_inputs: dict[str, Path],
                                                   tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    toml = _write_study(tiny_study_inputs, tmp_path, storage={field: url})
    text = refused(["run", str(toml)], capsys, tmp_path, f"storage.{field}", "***")
    assert not _leaks(text), text


def test_config_dump_and_mlflow_params_have_no_secret(tiny_study_inputs: dict[str, Path], tmp_path: Path) -> None:
    """What the record (study.json), config dumps and the MLflow parent run's params keep of the storage URLs."""
    import mlflow

    from search.config import parse_study_config
    from search.results.tracking import StudyTracker
    from tests.conftest import study_raw_config

    raw = study_raw_config(tiny_study_inputs, tmp_path / "runs", name="sec", storage={
        "optuna": URL_FORMS["query-password-upper-with-others"].replace("PORT", "5432"),
        "ray_storage": f"s3://bucket/ray?secret_access_key={ENCODED}"})
    config = parse_study_config(raw)
    dump = json.dumps(config.public_dump())
    assert not _leaks(dump) and "sslmode=disable" in dump
    tracker = StudyTracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "sec", artifact_root=tmp_path / "art")
    run_id = tracker.start_study(config.public_dump(), config.digest(), {"baseline_size_bytes": 1.0})
    run = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(run_id)
    fields = json.dumps([run.data.params, run.data.tags, run.data.metrics])
    assert "storage" in fields and not _leaks(fields)


@pytest.mark.slow
def test_study_on_postgres_with_query_password_writes_no_secret(tiny_study_inputs: dict[str, Path], postgres,
                                                                tmp_path: Path) -> None:
    """A real study whose Optuna storage is PostgreSQL with the password in the query string, percent-encoded:
    no file of the study (optuna.db is elsewhere; study.json, status.json, MLflow's database and artifacts, Ray
    Tune's folders), no MLflow field and nothing `lsv run` / `lsv status` print holds the password."""
    import os
    import subprocess
    import sys

    import mlflow

    from search.redaction import SECRET_ENV
    from tests.test_cluster import _files_containing

    postgres.create_database("secrets")
    postgres.alter_password(SECRET)
    url = f"postgresql://lsv@127.0.0.1:{postgres.port}/secrets?password={ENCODED}"
    raw_toml = _write_study(tiny_study_inputs, tmp_path, study={"n_trials": 2, "concurrency": 1},
                            storage={"optuna": url})
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "RAY_AUTH_MODE": "disabled"}
    for name in SECRET_ENV:  # the password comes from the URL only
        env.pop(name, None)
    runs = [subprocess.run([sys.executable, "-m", "search.cli", *args], cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=600) for args in (["run", str(raw_toml)], ["status", str(raw_toml)])]
    assert runs[0].returncode == 0, runs[0].stderr[-3000:]
    assert runs[1].returncode == 0, runs[1].stderr[-3000:]
    for r in runs:
        assert not _leaks(r.stdout + r.stderr)
    study_dir = tmp_path / "runs" / "bad"
    assert (study_dir / "study.json").is_file() and (study_dir / "status.json").is_file()
    for form in _forms(SECRET):  # (the user's own config file holds the URL, of course)
        assert [f for f in _files_containing([tmp_path], form.encode()) if f != raw_toml] == [], form
    client = mlflow.MlflowClient(f"sqlite:///{study_dir / 'mlflow.db'}")
    exp = client.get_experiment_by_name("lsv/bad")
    assert exp is not None
    for run in client.search_runs([exp.experiment_id], max_results=1000):
        assert not _leaks(json.dumps([run.data.params, run.data.tags, run.data.metrics]))
