"""The review server: :class:`ReviewApp` (what it serves for one run) on the standard
library's ``ThreadingHTTPServer``, which ``review.serve`` (``skufleet review``) runs.

Routes: ``/`` the contact sheet (``review_sheet.render_page``), ``/api/items`` the run's
reviewable items as JSON, ``/image/<item id>`` the item's stored image from the bucket as a
thumbnail (404 for an item of no run or an object gone), ``POST /api/items/<id>/approve``
and ``/reject`` (the item's new state as JSON; 409 when it has no stored image to decide on).

Its rules are Flower's (:mod:`skufleet.producer.flower`):

- without ``SKUFLEET_FLOWER_BASIC_AUTH`` it listens on the loopback address only, and
  answers only requests whose ``Host`` is a loopback name (another site's name that a DNS
  rebinding points at 127.0.0.1 gets 421); decisions carry the caller's ``--reviewer`` or
  ``user@host``;
- with credentials, every page, image and API call needs HTTP Basic (401 and a challenge
  otherwise, whatever the path or method), and decisions carry the login's user name;
- every POST carries the server's random token in ``X-Skufleet-Token``; only the page knows
  it (embedded in it), so no other site can make a reviewer's browser decide (403).
"""

from __future__ import annotations

import base64
import binascii
import collections
import hmac
import json
import logging
import re
import secrets
import threading
from collections.abc import Callable, Sequence
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from skufleet.producer.bucket import Bucket
from skufleet.producer.flower import authorized, is_loopback
from skufleet.producer.publish import Publisher
from skufleet.producer.review import approve, item_state, reject
from skufleet.producer.review_sheet import (
    LOW_MARGIN,
    page_items,
    read_object,
    render_page,
    thumbnail,
)
from skufleet.schemas import ledger
from skufleet.schemas.errors import RetryableError, SkufleetError, one_line
from skufleet.schemas.tables import Item

log = logging.getLogger(__name__)

TOKEN_HEADER = "X-Skufleet-Token"
MAX_BODY = 64 * 1024
"""Bytes of a POST body read at most (a decision carries an optional note)."""
MAX_NOTE = 2000
THUMBNAIL_CACHE = 512
"""Thumbnails the server keeps in memory, by item and image hash."""
REALM = "skufleet review"

_IMAGE = re.compile(r"/image/(\d{1,18})")
_DECISION = re.compile(r"/api/items/(\d{1,18})/(approve|reject)")
_ACTIONS: dict[str, ledger.Decision] = {"approve": "approved", "reject": "rejected"}


def page_csp(nonce: str) -> str:
    """The served page's Content-Security-Policy."""
    return (
        "default-src 'none'; img-src 'self' data:; connect-src 'self'; "
        f"style-src 'nonce-{nonce}'; script-src 'nonce-{nonce}'; base-uri 'none'; "
        "form-action 'none'; frame-ancestors 'none'"
    )


class ReviewApp:
    """What the review server serves, for one run: the page, the items, thumbnails and
    decisions (see the module docstring). ``publisher`` is called once, at the first reject.
    """

    def __init__(
        self,
        engine: Engine,
        bucket: Bucket,
        run_name: str,
        *,
        publisher: Callable[[], Publisher],
        queue_prefix: str,
        reviewer_default: str,
        credentials: Sequence[str] = (),
        loopback_only: bool = True,
    ) -> None:
        self.engine = engine
        self.bucket = bucket
        self.run_name = run_name
        with ledger.connect(engine) as conn:
            self.run_id = ledger.find_run_id(conn, run_name)
        self._publisher_factory = publisher
        self._publisher: Publisher | None = None
        self.queue_prefix = queue_prefix
        self.reviewer_default = reviewer_default
        self.credentials = list(credentials)
        self.loopback_only = loopback_only
        self.token = secrets.token_urlsafe(32)
        """Sent back with every POST (``X-Skufleet-Token``); only the page knows it."""
        self._decisions = threading.Lock()
        self._thumbs: collections.OrderedDict[tuple[int, str], tuple[bytes, str]] = (
            collections.OrderedDict()
        )
        self._thumbs_lock = threading.Lock()

    @property
    def publisher(self) -> Publisher:
        if self._publisher is None:
            self._publisher = self._publisher_factory()
        return self._publisher

    def connect(self) -> None:
        """Connect to the broker now rather than at the first reject."""
        self._publisher = self.publisher

    def user(self, header: str) -> str | None:
        """The basic-auth user the ``Authorization`` header proves (None: it proves none)."""
        if not authorized(header, self.credentials):
            return None
        try:
            given = base64.b64decode(header.strip().partition(" ")[2].strip(), validate=True)
        except binascii.Error:  # pragma: no cover - authorized() decoded it already
            return None
        return given.decode("utf-8", "replace").partition(":")[0]

    def items(self) -> list[dict[str, Any]]:
        with ledger.connect(self.engine) as conn:
            return page_items(conn, self.run_id)

    def config(self, reviewer: str) -> dict[str, Any]:
        return {
            "mode": "live",
            "run": self.run_name,
            "token": self.token,
            "reviewer": reviewer,
            "low_margin": LOW_MARGIN,
        }

    def image(self, item_id: int) -> tuple[bytes, str, str] | None:
        """``(thumbnail, content type, etag)`` of the item's stored image; None if the run
        has no such item or its object is not in the bucket."""
        with ledger.connect(self.engine) as conn:
            row = conn.execute(
                sa.select(Item.object_key, Item.sha256).where(
                    Item.id == item_id, Item.run_id == self.run_id
                )
            ).first()
        if row is None or row.object_key is None or row.sha256 is None:
            return None
        cache_key = (item_id, str(row.sha256))
        with self._thumbs_lock:
            cached = self._thumbs.get(cache_key)
            if cached is not None:
                self._thumbs.move_to_end(cache_key)
                return (*cached, f'"{row.sha256}"')
        found = read_object(self.bucket, row.object_key)
        if found is None:
            return None
        made = thumbnail(found)
        with self._thumbs_lock:
            self._thumbs[cache_key] = made
            while len(self._thumbs) > THUMBNAIL_CACHE:
                self._thumbs.popitem(last=False)
        return (*made, f'"{row.sha256}"')

    def decide(self, item_id: int, action: str, reviewer: str, note: str) -> dict[str, Any]:
        """Approve or reject one item; its new state (:func:`item_state`) and ``decided``."""
        decision = _ACTIONS[action]
        with self._decisions:  # one at a time: decisions are human-paced
            if decision == "rejected":
                result = reject(
                    self.engine,
                    self.publisher,
                    self.run_name,
                    [item_id],
                    reviewer,
                    self.queue_prefix,
                    note,
                )
            else:
                result = approve(self.engine, self.run_name, [item_id], reviewer, note)
        with ledger.connect(self.engine) as conn:
            state = item_state(conn, self.run_id, item_id)
        return {
            **(state or {"id": item_id, "status": None}),
            "decided": result["decided"] == 1,
            "enqueued": result["enqueued"],
        }


class ReviewServer(ThreadingHTTPServer):
    """The review app on a socket; one thread per request."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, app: ReviewApp, address: tuple[str, int]) -> None:
        self.app = app
        super().__init__(address, _Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        name = host.decode() if isinstance(host, bytes) else str(host)
        shown = f"[{name}]" if ":" in name else name
        return f"http://{shown}:{port}/"


class _Handler(BaseHTTPRequestHandler):
    server: ReviewServer
    server_version = "skufleet-review"
    sys_version = ""
    protocol_version = "HTTP/1.1"

    # --- answers --------------------------------------------------------------------------

    def _send(
        self,
        status: int,
        body: bytes,
        content_type: str,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("X-Frame-Options", "DENY")
        self.send_header("Referrer-Policy", "no-referrer")
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, value: Any, headers: dict[str, str] | None = None) -> None:
        body = json.dumps(value, ensure_ascii=False).encode("utf-8")
        self._send(
            status,
            body,
            "application/json; charset=utf-8",
            {"Cache-Control": "no-store", **(headers or {})},
        )

    def _error(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        self._json(status, {"error": message}, headers)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)

    # --- the gate every request passes --------------------------------------------------

    def _allowed(self) -> str | None:
        """The reviewer's name, or None after answering 401 (or 421 for a foreign Host)."""
        app = self.server.app
        if app.credentials:
            user = app.user(self.headers.get("Authorization", ""))
            if user is None:
                self._error(
                    HTTPStatus.UNAUTHORIZED,
                    "authentication required",
                    {"WWW-Authenticate": f'Basic realm="{REALM}", charset="UTF-8"'},
                )
                return None
            return user
        if app.loopback_only:
            # a page of another site whose name now resolves to 127.0.0.1 (DNS rebinding)
            # sends its own name as Host: only loopback names reach the review
            host = urlsplit("//" + self.headers.get("Host", "")).hostname or ""
            if not is_loopback(host):
                self._error(HTTPStatus.MISDIRECTED_REQUEST, "this server answers loopback names")
                return None
        return app.reviewer_default

    def _route(self, handler: Callable[[str, str], None]) -> None:
        reviewer = self._allowed()
        if reviewer is None:
            return
        path = urlsplit(self.path).path
        try:
            handler(path, reviewer)
        except RetryableError as exc:
            self._error(HTTPStatus.SERVICE_UNAVAILABLE, one_line(exc))
        except SkufleetError as exc:
            self._error(HTTPStatus.CONFLICT, one_line(exc))
        except sa.exc.SQLAlchemyError as exc:
            log.warning("the ledger failed: %s", one_line(exc))
            self._error(HTTPStatus.SERVICE_UNAVAILABLE, "the ledger failed")
        except (BrokenPipeError, ConnectionResetError):
            pass
        except Exception:
            log.exception("%s %s failed", self.command, path)
            self._error(HTTPStatus.INTERNAL_SERVER_ERROR, "internal error; see the server's log")

    def do_GET(self) -> None:
        self._route(self._get)

    def do_HEAD(self) -> None:
        self._route(self._get)

    def do_POST(self) -> None:
        self._route(self._post)

    # --- routes -------------------------------------------------------------------------

    def _get(self, path: str, reviewer: str) -> None:
        app = self.server.app
        if path in ("/", "/index.html"):
            nonce = secrets.token_urlsafe(18)
            page = render_page(app.config(reviewer), nonce, static=False).encode("utf-8")
            self._send(
                HTTPStatus.OK,
                page,
                "text/html; charset=utf-8",
                {"Content-Security-Policy": page_csp(nonce), "Cache-Control": "no-store"},
            )
            return
        if path == "/api/items":
            self._json(HTTPStatus.OK, {"run": app.run_name, "items": app.items()})
            return
        image = _IMAGE.fullmatch(path)
        if image is not None:
            found = app.image(int(image.group(1)))
            if found is None:
                self._error(HTTPStatus.NOT_FOUND, "no stored image for that item of this run")
                return
            body, content_type, etag = found
            headers = {"ETag": etag, "Cache-Control": "private, max-age=3600"}
            if self.headers.get("If-None-Match") == etag:
                self.send_response(HTTPStatus.NOT_MODIFIED)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self._send(HTTPStatus.OK, body, content_type, headers)
            return
        self._error(HTTPStatus.NOT_FOUND, "not found")

    def _post(self, path: str, reviewer: str) -> None:
        app = self.server.app
        given = self.headers.get(TOKEN_HEADER, "")
        length = self._length()
        if length is None:
            return
        body = self.rfile.read(length) if length else b""
        if not hmac.compare_digest(given.encode(), app.token.encode()):
            self._error(HTTPStatus.FORBIDDEN, f"missing or wrong {TOKEN_HEADER}: reload the page")
            return
        match = _DECISION.fullmatch(path)
        if match is None:
            self._error(HTTPStatus.NOT_FOUND, "not found")
            return
        note = ""
        if body.strip():
            try:
                parsed = json.loads(body)
            except ValueError:
                self._error(HTTPStatus.BAD_REQUEST, "the body is not JSON")
                return
            if isinstance(parsed, dict) and isinstance(parsed.get("note"), str):
                note = parsed["note"][:MAX_NOTE]
        item_id, action = int(match.group(1)), match.group(2)
        result = app.decide(item_id, action, reviewer, note)
        if not result["decided"]:
            status = result.get("status")
            why = (
                "no such item in this run"
                if status is None
                else f"the item is {status}: it has no stored image to decide on"
            )
            self._json(HTTPStatus.CONFLICT, {**result, "error": why})
            return
        self._json(HTTPStatus.OK, result)

    def _length(self) -> int | None:
        raw = self.headers.get("Content-Length", "0") or "0"
        try:
            length = int(raw)
        except ValueError:
            self._error(HTTPStatus.BAD_REQUEST, "bad Content-Length")
            return None
        if not 0 <= length <= MAX_BODY:
            self.close_connection = True
            self._error(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"a body is at most {MAX_BODY} bytes")
            return None
        return length
