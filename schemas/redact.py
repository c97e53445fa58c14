"""URLs made safe to print: no password, token or query string reaches a terminal or a log.

Redis and PostgreSQL passwords live inside their URLs, an S3 endpoint may carry userinfo,
and a webhook URL is itself the secret (``https://hooks.example/services/T0KEN``, or
``?token=…``). Everything skufleet shows of a URL goes through :func:`redact_url`; messages
from libraries that quote a URL (botocore's ``Could not connect to the endpoint URL: "…"``)
go through :func:`redact_text`.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

MASK = "***"
"""What a password or any other userinfo secret is replaced with (SQLAlchemy's own mask)."""
ELIDED = "…"
"""What a hidden path, query string or fragment is replaced with."""

_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*")
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s\"'`<>]+")
"""A URL inside a message, up to the first space or quote."""


def redact_url(url: str, *, keep_path: bool = True) -> str:
    """``url`` without its secrets: the password of its userinfo becomes ``***``, a query
    string ``?…`` and a fragment ``#…``. With ``keep_path=False`` (webhook URLs, whose path
    is the token) only ``scheme://host:port/…`` is left, userinfo masked whole.

    A URL too malformed to parse (or whose path holds an ``@``: a password with an unescaped
    ``/`` in it) is shown as ``scheme://***``, never as given.
    """
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 -- raises ValueError for a port that is not a number
        if "@" in parts.path:
            raise ValueError("userinfo past the host")
    except ValueError:
        scheme = url.split("://", 1)[0] if "://" in url else ""
        return f"{scheme}://{MASK}" if _SCHEME.fullmatch(scheme) else MASK
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, host = netloc.rpartition("@")
        user, has_password, _ = userinfo.partition(":")
        if not keep_path:
            userinfo = MASK
        elif has_password:
            userinfo = f"{user}:{MASK}"
        netloc = f"{userinfo}@{host}"
    path = parts.path
    if not keep_path and path not in ("", "/"):
        path = "/" + ELIDED
    # assembled by hand: urlunsplit drops the empty authority of sqlite:////path
    shown = f"{parts.scheme}://{netloc}{path}" if "://" in url else f"{parts.scheme}:{path}"
    return shown + ("?" + ELIDED if parts.query else "") + ("#" + ELIDED if parts.fragment else "")


def redact_text(text: str) -> str:
    """``text`` with every URL in it that has userinfo, a query or a fragment passed through
    :func:`redact_url`; other URLs (and URL-like user text) are left as they are."""
    return _URL.sub(lambda match: _redact_found(match.group(0)), text)


def _redact_found(url: str) -> str:
    return redact_url(url) if any(mark in url for mark in "@?#") else url
