"""The study's Optuna storage: opening it, reading the study record kept there, and the sampler a config names."""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit, urlunsplit

import optuna
from sqlalchemy.exc import SQLAlchemyError

from lsv_core.errors import ConfigError, LsvError
from search.redaction import redacted, scrub
from search.results.record import StudyNotRun, StudyRecord, stored_record
from search.samplers.prior import HessianPriorSampler, ProbePriorSampler
from search.schema_race import open_racing, sqlite_file

if TYPE_CHECKING:
    from search.config import StudyConfig

__all__ = ["SAMPLERS", "check_mlflow_uri", "check_optuna_url", "make_sampler", "open_study", "rdb_storage",
           "read_record", "redacted", "scrub", "sqlite_file"]

CONNECT_TIMEOUT_S = 10
DRIVER_HINT = {"postgresql": "psycopg (pip install 'psycopg[binary]'; `make install` brings it)",
               "mysql": "a MySQL driver (pip install pymysql, and use mysql+pymysql://)"}


def rdb_storage(url: str) -> optuna.storages.RDBStorage:
    """Optuna's RDB storage at ``url``, safe against other processes creating its tables at the same moment
    (:func:`search.schema_race.open_racing`)."""
    return open_racing(lambda: optuna.storages.RDBStorage(url, heartbeat_interval=None), url)


def open_study(config: StudyConfig, *, create: bool) -> optuna.Study:
    """The study in ``config``'s Optuna storage; with ``create`` it is made when missing.

    Reading never creates anything: a SQLite file that does not exist means no study. A storage that
    cannot be opened is a :class:`ConfigError` naming the URL (password hidden).
    """
    url = config.optuna_url
    db = sqlite_file(url)
    if not create and db is not None and not db.is_file():
        raise ConfigError(f"no study {config.study.name!r}: {db} does not exist")
    try:
        storage = rdb_storage(url)
        if not create:
            return optuna.load_study(study_name=config.study.name, storage=storage)
        study = optuna.create_study(study_name=config.study.name, storage=storage,
                                    directions=["minimize", "minimize"], sampler=make_sampler(config),
                                    load_if_exists=True)
        from search.objectives import objective_names

        names = objective_names(config.objectives.accuracy, config.objectives.p_target)
        if study.metric_names != names:  # new studies, and those made before they were named
            with warnings.catch_warnings():  # experimental since Optuna 3.2, unchanged through 5.1
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                study.set_metric_names(names)
        return study
    except KeyError:
        raise ConfigError(f"no study {config.study.name!r} in {redacted(url)}") from None
    except (ImportError, SQLAlchemyError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"storage.optuna={redacted(url)!r}: cannot open the Optuna storage "
                          f"({type(err).__name__}: {scrub(reason, url)})") from None


def read_record(config: StudyConfig) -> tuple[StudyRecord, optuna.Study]:
    """The record and the Optuna study of ``config``'s study; :class:`StudyNotRun` when there is none.

    Studies made before the record existed have only ``study.json`` (digest and config); their record
    is read from there, without layer order or digests.
    """
    try:
        study = open_study(config, create=False)
    except LsvError:
        raise StudyNotRun(f"study {config.study.name!r} has not been run yet (no such study in "
                          f"{redacted(config.optuna_url)}); start it with `lsv run`") from None
    record = stored_record(study)
    if record is None:
        legacy = config.study_dir / "study.json"
        if not legacy.is_file():
            raise StudyNotRun(f"study {config.study.name!r} in {redacted(config.optuna_url)} has no record "
                              "(it was never started by `lsv run`)")
        old = json.loads(legacy.read_text())
        record = StudyRecord(name=config.study.name, digest=str(old.get("digest")), config=old.get("config") or {})
    return record, study


# study.sampler (one of search.samplers.names.SAMPLER_NAMES) -> factory(seed). Eight startup trials: the seed recipes fill most of them.
SAMPLERS: dict[str, Callable[[int], optuna.samplers.BaseSampler]] = {
    "tpe": lambda seed: optuna.samplers.TPESampler(seed=seed, multivariate=True, n_startup_trials=8),
    "nsga2": lambda seed: optuna.samplers.NSGAIISampler(seed=seed, population_size=8),
    "gp": lambda seed: optuna.samplers.GPSampler(seed=seed, n_startup_trials=8),
    "random": lambda seed: optuna.samplers.RandomSampler(seed=seed),
    "hessian": lambda seed: HessianPriorSampler(seed=seed),
    "probe": lambda seed: ProbePriorSampler(seed=seed),
}


def make_sampler(config: StudyConfig) -> optuna.samplers.BaseSampler:
    """The sampler ``study.sampler`` names (see :data:`SAMPLERS`), seeded with ``study.seed``."""
    return SAMPLERS[config.study.sampler](config.study.seed)


def _sqlite_problems(db: Path, study_dir: Path) -> list[str]:
    db = db.expanduser().resolve()
    if db.exists():
        return [] if os.access(db, os.R_OK | os.W_OK) else [f"{db} is not writable"]
    folder = db.parent
    inside_study = folder == study_dir or study_dir in folder.parents
    if not folder.is_dir() and not inside_study:
        return [f"folder {folder} of the SQLite file does not exist (create it, or leave the field out to keep "
                "the database in the study folder)"]
    if folder.is_dir() and not os.access(folder, os.W_OK | os.X_OK):
        return [f"folder {folder} is not writable"]
    return []


def check_optuna_url(url: str, study_dir: Path) -> list[str]:
    """Problems opening ``url`` for Optuna, found without creating anything: a SQLite file that cannot be
    made, a missing database driver, or a server that does not answer within ``CONNECT_TIMEOUT_S``."""
    db = sqlite_file(url)
    if db is not None:
        return _sqlite_problems(db, study_dir)
    if url.startswith("sqlite"):
        return []
    from sqlalchemy import create_engine, text

    scheme = urlsplit(url).scheme.split("+")[0]
    try:
        engine = create_engine(url, connect_args={"connect_timeout": CONNECT_TIMEOUT_S} if scheme == "postgresql"
                               else {})
    except (ImportError, ModuleNotFoundError) as err:
        return [f"{redacted(url)}: no database driver for {scheme} ({err}); install "
                f"{DRIVER_HINT.get(scheme, 'its SQLAlchemy driver')}"]
    except Exception as err:  # noqa: BLE001 - SQLAlchemy raises ArgumentError and others for a bad URL
        return [f"{redacted(url)} is not a usable database URL ({scrub(str(err), url)})"]
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except (ImportError, ModuleNotFoundError) as err:
        return [f"{redacted(url)}: no database driver for {scheme} ({err}); install "
                f"{DRIVER_HINT.get(scheme, 'its SQLAlchemy driver')}"]
    except Exception as err:  # noqa: BLE001 - OperationalError etc.: the message says why
        reason = str(getattr(err, "orig", None) or err).strip().splitlines()
        return [f"cannot connect to {redacted(url)} ({scrub(reason[0] if reason else type(err).__name__, url)})"]
    finally:
        engine.dispose()
    return []


def check_mlflow_uri(uri: str, study_dir: Path) -> list[str]:
    """Problems with an MLflow tracking URI: a SQLite file that cannot be made, a database that does not
    answer (as :func:`check_optuna_url`), or a server that does not answer ``/health``."""
    db = sqlite_file(uri)
    if db is not None:
        return _sqlite_problems(db, study_dir)
    if uri.startswith(("postgresql", "mysql", "mssql")):  # a database as MLflow's backend store: same check
        return check_optuna_url(uri, study_dir)
    if uri.startswith(("http://", "https://")):
        import urllib.error
        import urllib.request

        url = uri.rstrip("/") + "/health"
        parts = urlsplit(url)
        if parts.password is not None:  # credentials belong in MLFLOW_TRACKING_USERNAME/PASSWORD
            url = urlunsplit(parts._replace(netloc=parts.hostname + (f":{parts.port}" if parts.port else "")))
        try:
            with urllib.request.urlopen(url, timeout=CONNECT_TIMEOUT_S):
                return []
        except urllib.error.HTTPError:
            return []  # something answers (auth, proxy): MLflow will talk to it
        except (urllib.error.URLError, OSError) as err:
            return [f"no MLflow server answers at {redacted(uri)} ({getattr(err, 'reason', err)}); start it with "
                    "`mlflow server --host ... --port ...` or fix the URI"]
    return []
