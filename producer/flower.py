"""Flower behind skufleet's login: with credentials set, every endpoint asks for them.

Flower's own basic auth guards its pages and API but, by design, not ``/metrics`` and
``/healthcheck`` (flower#1342): bound beyond the loopback address, those two would tell
anyone who asks which workers and tasks the fleet runs. :func:`serve` runs Flower in this
process with an application (:class:`AuthenticatedFlower`) that checks the
``Authorization`` header, as Flower's ``BaseHandler`` does, before it routes a request at
all, so no handler, today's or a future version's, answers without the login.

The credentials come from ``SKUFLEET_FLOWER_BASIC_AUTH`` through :class:`Settings`, never
from the command line, where ``ps`` would show them.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import ipaddress
import logging
import signal
from collections.abc import Sequence
from typing import Any

import tornado.web
from celery import Celery
from flower import options as _flower_options  # noqa: F401 (defines Flower's options)
from flower.app import Flower
from flower.urls import settings as flower_settings
from tornado.httputil import HTTPServerRequest
from tornado.options import options

from skufleet.schemas.broker import celery_settings
from skufleet.schemas.errors import ConfigError
from skufleet.schemas.settings import Settings

log = logging.getLogger(__name__)

MIN_PASSWORD = 12
"""Characters a Flower password needs at least."""
STATE_FILE = "flower.db"
"""Flower's persistent state, in ``SKUFLEET_CACHE_DIR``."""
PURGE_OFFLINE_SECONDS = 3600
"""Workers offline this long leave Flower's lists and metrics."""


def parse_basic_auth(value: str) -> list[str]:
    """``user:password[,user:password…]`` as Flower's list of ``user:password`` strings.

    Each user and password must be non-empty, and each password at least
    :data:`MIN_PASSWORD` characters. The error names the pair by position and user, never
    the password.
    """
    pairs = value.split(",")
    for number, pair in enumerate(pairs, start=1):
        user, colon, password = pair.partition(":")
        where = f"SKUFLEET_FLOWER_BASIC_AUTH pair {number} of {len(pairs)}"
        if not colon:
            raise ConfigError(f"{where} has no ':': write it as user:password")
        if not user.strip():
            raise ConfigError(f"{where} has an empty user: write it as user:password")
        if len(password) < MIN_PASSWORD:
            raise ConfigError(
                f"{where} (user {user!r}): the password has {len(password)} characters, "
                f"it needs at least {MIN_PASSWORD}"
            )
    return pairs


def is_loopback(address: str) -> bool:
    """Whether ``address`` is reachable from this machine only (``''`` means every one)."""
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def authorized(header: str, credentials: Sequence[str]) -> bool:
    """Whether the ``Authorization`` header carries one of ``credentials`` (``user:pass``).

    The check Flower's ``BaseHandler.get_current_user`` makes, comparing in constant time
    with every pair so that the answer's timing does not tell which user exists.
    """
    scheme, _, encoded = header.strip().partition(" ")
    if scheme != "Basic":
        return False
    try:
        given = base64.b64decode(encoded.strip(), validate=True)
    except binascii.Error:
        return False
    return any([hmac.compare_digest(given, pair.encode()) for pair in credentials])


class Unauthorized(tornado.web.RequestHandler):
    """Answers every request it gets with 401 and a Basic challenge, whatever its method."""

    def check_xsrf_cookie(self) -> None:
        pass  # nothing is done here for anyone: the answer is 401, not Flower's 403

    def prepare(self) -> None:
        self.set_status(401)
        self.set_header("WWW-Authenticate", 'Basic realm="flower"')
        self.finish("Access denied")


class AuthenticatedFlower(Flower):
    """Flower whose every path, ``/metrics`` and ``/healthcheck`` included, needs the login
    whenever basic auth is configured."""

    def find_handler(self, request: HTTPServerRequest, **kwargs: Any) -> Any:
        credentials = self.options.basic_auth
        if credentials and not authorized(request.headers.get("Authorization", ""), credentials):
            return self.get_handler_delegate(request, Unauthorized)
        return super().find_handler(request, **kwargs)


def celery_app(settings: Settings) -> Celery:
    """The Celery app Flower watches the fleet through: the broker, JSON events only."""
    app = Celery("skufleet-flower", broker=settings.redis_url, set_as_current=False)
    app.conf.update(celery_settings(settings))  # nothing of its own to add
    return app


def listen_credentials(settings: Settings, address: str, what: str) -> list[str]:
    """The basic-auth credentials (``user:password``) of ``SKUFLEET_FLOWER_BASIC_AUTH``,
    checked; ConfigError when there are none and ``address`` is not a loopback address:
    Flower's rule, which the review server (``what``) follows too."""
    auth = settings.flower_basic_auth
    credentials = parse_basic_auth(auth.get_secret_value()) if auth is not None else []
    if not credentials and not is_loopback(address):
        raise ConfigError(
            f"refusing to start {what} on {address or 'every address'} without "
            "authentication: set SKUFLEET_FLOWER_BASIC_AUTH=user:password, or listen on "
            "127.0.0.1"
        )
    return credentials


def serve(settings: Settings, *, address: str, port: int) -> None:
    """Run Flower on ``address:port`` until SIGTERM or SIGINT, its state persisted in
    ``SKUFLEET_CACHE_DIR``.

    Raises ConfigError for a malformed ``SKUFLEET_FLOWER_BASIC_AUTH``, or when it is unset
    and ``address`` is not the loopback address.
    """
    # 1. credentials: required beyond loopback, well-formed wherever given
    credentials = listen_credentials(settings, address, "Flower")

    # 2. Flower's options, set here rather than parsed from a command line or FLOWER_*
    settings.cache_dir.mkdir(parents=True, exist_ok=True)
    options.address = address
    options.port = port
    options.basic_auth = credentials
    options.persistent = True
    options.db = str(settings.cache_dir / STATE_FILE)
    options.purge_offline_workers = PURGE_OFFLINE_SECONDS
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s flower %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("tornado.access").setLevel(logging.ERROR)  # as Flower: no line per request

    # 3. serve until stopped; stopping saves the state
    app = AuthenticatedFlower(capp=celery_app(settings), options=options, **flower_settings)
    try:
        app.start_http_server()
    except OSError as exc:  # the port is taken, or the address is not this machine's
        raise ConfigError(f"cannot listen on {address}:{port}: {exc.strerror}") from exc
    app.io_loop.asyncio_loop.add_signal_handler(signal.SIGTERM, app.stop)
    log.info(
        "Flower on http://%s:%d (%s)",
        address,
        port,
        "basic auth on every endpoint" if credentials else "no auth: loopback only",
    )
    try:
        app.start()
    except KeyboardInterrupt:
        pass
    finally:
        app.stop()
