"""Passwords out of URLs: what logs, errors, records and MLflow params may show of a storage URL.

Its own module because both the config (``StudyConfig.public_dump``) and the storage (its error messages)
need it, and the storage already depends on the config.
"""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

__all__ = ["redacted", "scrub"]


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
