"""Passwords out of URLs: what logs, errors, records and MLflow params may show of a storage URL.

Its own module because both the config (``StudyConfig.public_dump``) and the storage (its error messages)
need it, and the storage already depends on the config.
"""

from __future__ import annotations

import os
from urllib.parse import unquote, unquote_plus

__all__ = ["SECRET_PARAMS", "redacted", "remember_secrets", "scrub", "scrub_known", "secrets_in"]

# Query parameters that carry secrets in database and service URLs (libpq: password, sslpassword; MySQL
# drivers: passwd; ODBC: pwd; object stores and tokens).
SECRET_PARAMS = frozenset({"password", "passwd", "pwd", "sslpassword", "secret", "token", "access_token",
                           "auth_token", "api_key", "apikey", "aws_secret_access_key", "secret_access_key"})
# Environment variables whose values are credentials the study's clients read (never shown either).
SECRET_ENV = ("PGPASSWORD", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN", "RAY_AUTH_TOKEN")
_remembered: set[str] = set()


def _split_netloc(url: str) -> tuple[str, str, str]:
    """``(before, netloc, after)`` of ``url``, by plain string splitting (no port parsing, nothing normalised)."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return "", "", url
    end = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
    return scheme + sep, rest[:end], rest[end:]


def _is_secret_param(piece: str) -> bool:
    key, sep, _ = piece.partition("=")
    return bool(sep) and unquote_plus(key).strip().lower() in SECRET_PARAMS


def redacted(url: str) -> str:
    """``url`` with every secret replaced by ``***``: the password of its user info and the values of secret
    query parameters (``?password=...``, :data:`SECRET_PARAMS`), percent-encoded or not. What logs, errors,
    records and MLflow may show."""
    head, netloc, tail = _split_netloc(url)
    userinfo, at, hostport = netloc.rpartition("@")
    if at and ":" in userinfo:
        netloc = f"{userinfo.split(':', 1)[0]}:***@{hostport}"
    path, q, query = tail.partition("?")
    if q:
        query, hash_, fragment = query.partition("#")
        query = "&".join(f"{p.partition('=')[0]}=***" if _is_secret_param(p) else p for p in query.split("&"))
        tail = f"{path}?{query}{hash_}{fragment}"
    return head + netloc + tail


def secrets_in(url: str) -> list[str]:
    """The secrets ``url`` carries (user-info password, secret query values), as written and decoded, longest
    first (so that replacing them in turn leaves no piece of a longer one)."""
    _, netloc, tail = _split_netloc(url)
    userinfo, at, _ = netloc.rpartition("@")
    found = [userinfo.split(":", 1)[1]] if at and ":" in userinfo else []
    query = tail.partition("?")[2].partition("#")[0]
    found += [p.partition("=")[2] for p in query.split("&") if _is_secret_param(p)]
    forms = {f for s in found for f in (s, unquote(s), unquote_plus(s))}
    forms |= {repr(f)[1:-1] for f in forms}  # as it shows inside a repr() (backslashes, quotes escaped)
    return sorted((f for f in forms if f), key=len, reverse=True)


def remember_secrets(*urls: str | None) -> None:
    """Note the secrets of ``urls`` (a study's storage URLs), so :func:`scrub_known` hides them in any text."""
    for url in urls:
        if url:
            _remembered.update(secrets_in(url))


def scrub_known(text: str) -> str:
    """``text`` without any secret this process was given: those of :func:`remember_secrets` and the values of
    :data:`SECRET_ENV`. The last filter before a message reaches the console."""
    found = _remembered | {v for k in SECRET_ENV if (v := os.environ.get(k))}
    for secret in sorted(found, key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


def scrub(text: str, url: str) -> str:
    """``text`` with the secrets of ``url`` (and of :func:`scrub_known`) replaced by ``***``, e.g. in a driver's
    error message."""
    for secret in secrets_in(url):
        text = text.replace(secret, "***")
    return scrub_known(text)
