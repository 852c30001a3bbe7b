"""The study's Optuna storage: opening it and the sampler a config names."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit, urlunsplit

import optuna
from sqlalchemy.exc import SQLAlchemyError

from lsv_core.errors import ConfigError
from search.samplers import HessianPriorSampler

if TYPE_CHECKING:
    from search.config import StudyConfig

__all__ = ["SAMPLERS", "make_sampler", "open_study", "redacted", "scrub", "sqlite_file"]


def redacted(url: str) -> str:
    """``url`` with its password replaced by ``***`` (what logs, errors and records may show)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{user}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def scrub(text: str, url: str) -> str:
    """``text`` with the password of ``url`` (if any) replaced by ``***``, e.g. in a driver's error message."""
    password = urlsplit(url).password
    return text.replace(password, "***") if password else text


def sqlite_file(url: str) -> Path | None:
    """The database file of a ``sqlite:///`` URL (None for other databases and in-memory SQLite)."""
    if not url.startswith("sqlite:///"):
        return None
    path = url[len("sqlite:///"):].split("?", 1)[0]
    return Path(path) if path and path != ":memory:" else None


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
        storage = optuna.storages.RDBStorage(url, heartbeat_interval=None)
        if not create:
            return optuna.load_study(study_name=config.study.name, storage=storage)
        return optuna.create_study(study_name=config.study.name, storage=storage,
                                   directions=["minimize", "minimize"], sampler=make_sampler(config),
                                   load_if_exists=True)
    except KeyError:
        raise ConfigError(f"no study {config.study.name!r} in {redacted(url)}") from None
    except (ImportError, SQLAlchemyError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"storage.optuna={redacted(url)!r}: cannot open the Optuna storage "
                          f"({type(err).__name__}: {scrub(reason, url)})") from None


# study.sampler -> factory(seed). Eight startup trials: the seed recipes fill most of them.
SAMPLERS: dict[str, Callable[[int], optuna.samplers.BaseSampler]] = {
    "tpe": lambda seed: optuna.samplers.TPESampler(seed=seed, multivariate=True, n_startup_trials=8),
    "nsga2": lambda seed: optuna.samplers.NSGAIISampler(seed=seed, population_size=8),
    "gp": lambda seed: optuna.samplers.GPSampler(seed=seed, n_startup_trials=8),
    "random": lambda seed: optuna.samplers.RandomSampler(seed=seed),
    "hessian": lambda seed: HessianPriorSampler(seed=seed),
}


def make_sampler(config: StudyConfig) -> optuna.samplers.BaseSampler:
    """The sampler ``study.sampler`` names (see :data:`SAMPLERS`), seeded with ``study.seed``."""
    return SAMPLERS[config.study.sampler](config.study.seed)
