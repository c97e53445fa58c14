"""The Redis transport of a worker, hardened against messages it cannot read.

kombu's Redis transport parses every list item it pops as a JSON envelope, inside the
worker's event loop: raw bytes that are not JSON, or JSON that is not an envelope (no
``properties`` or ``delivery_tag``, a body that is not valid base64), raise there, and the
worker exits with "Unrecoverable error". Anyone who can write to Redis could stop a fleet
with one ``LPUSH``.

This transport checks each item as Redis hands it over, before kombu reads it. An item that
is not a well-formed envelope is moved, as it was, to a dead-letter list
(``<queue>.undecodable``, the newest :data:`DEAD_LETTER_LIMIT` kept) with one log line, and
the worker goes on. Envelopes that are well formed but carry something else (a pickle, an
unknown task, arguments of the wrong shape) are Celery's to refuse, which it does without
stopping. Selected in :func:`worker.celery_app.create_app` for ``redis://`` and
``rediss://`` brokers.
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
import logging
from typing import Any

from kombu.transport import redis as kombu_redis

log = logging.getLogger(__name__)

DEAD_LETTER_SUFFIX = ".undecodable"
DEAD_LETTER_LIMIT = 1000
"""Undecodable items kept per queue for inspection; older ones are dropped."""
_POPS = ("BRPOP", "RPOP")


def envelope_problem(raw: bytes | str) -> str | None:
    """Why ``raw`` is not a message envelope kombu can read, or None when it is one."""
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        envelope = json.loads(text)
    except (UnicodeDecodeError, ValueError) as exc:
        return f"not JSON ({type(exc).__name__}: {exc})"
    if not isinstance(envelope, dict):
        return f"a JSON {type(envelope).__name__}, not an object"
    properties = envelope.get("properties")
    if not isinstance(properties, dict) or "delivery_tag" not in properties:
        return "no properties.delivery_tag"
    if not isinstance(properties.get("delivery_info", {}), dict):
        return "properties.delivery_info is not an object"
    body = envelope.get("body")
    if body is not None and not isinstance(body, str):
        return f"the body is a {type(body).__name__}, not a string"
    if body and properties.get("body_encoding") == "base64":
        try:
            base64.b64decode(body.encode("ascii"), validate=True)
        except (UnicodeEncodeError, binascii.Error) as exc:
            return f"the body is not valid base64 ({exc})"
    if not isinstance(envelope.get("headers", {}), dict):
        return "headers is not an object"
    return None


class Channel(kombu_redis.Channel):
    """A Redis channel whose pops set aside the items kombu could not read."""

    def _get_client(self) -> Any:
        client = super()._get_client()
        base, keywords = (
            (client.func, client.keywords)
            if isinstance(client, functools.partial)
            else (client, {})
        )
        channel = self

        class CheckedRedis(base):  # type: ignore[misc, valid-type]
            def parse_response(self, connection: Any, command_name: Any, **options: Any) -> Any:
                reply = super().parse_response(connection, command_name, **options)
                if reply and command_name in _POPS:
                    return channel._checked(command_name, reply, options)
                return reply

        return functools.partial(CheckedRedis, **keywords) if keywords else CheckedRedis

    def _checked(self, command: str, reply: Any, options: dict[str, Any]) -> Any:
        """``reply`` if it holds a readable envelope; otherwise park the item and return
        nothing, so kombu sees an empty pop and the event loop goes on."""
        if command == "BRPOP":
            queue, item = reply
        else:
            queue, item = options.get("keys", [b"?"])[0], reply
        problem = envelope_problem(item)
        if problem is None:
            return reply
        name = queue.decode("utf-8", "replace") if isinstance(queue, bytes) else str(queue)
        parked = name + DEAD_LETTER_SUFFIX
        try:
            with self.conn_or_acquire() as client:
                client.lpush(parked, item)
                client.ltrim(parked, 0, DEAD_LETTER_LIMIT - 1)
        except self.connection_errors as exc:  # Redis gone between the pop and this
            log.error(
                "dropped an undecodable message from %s (%s); not parked: %s", name, problem, exc
            )
            return None
        log.error(
            "set aside an undecodable message from %s on %s: %s (%d bytes)",
            name,
            parked,
            problem,
            len(item),
        )
        return None


class Transport(kombu_redis.Transport):
    """kombu's Redis transport with :class:`Channel`."""

    Channel = Channel


TRANSPORT = f"{__name__}:Transport"
"""What ``broker_transport`` names to select this transport."""
