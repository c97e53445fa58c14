"""A dependency that goes away mid-run is a RetryableError however its connection fails:
the reconciler's --watch loop outlives a Redis restart or a database failover only if
nothing else escapes a pass."""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

import pytest
import sqlalchemy as sa

from skufleet.producer.publish import Publisher
from skufleet.producer.reconcile import reconcile
from skufleet.producer.services import LocalRedis, free_port
from skufleet.schemas.errors import BrokerUnavailable, LedgerUnavailable
from skufleet.schemas.params import RenderPayload
from skufleet.schemas.settings import Settings

QUEUE = "skufleet.render.tiny"
PAYLOAD = RenderPayload(run_id=1, model="tiny", item_ids=[1])


# these start a private redis-server and reach PostgreSQL: not for the fast tier
pytestmark = pytest.mark.services


@contextmanager
def resetting(port: int) -> Iterator[None]:
    """Accept each connection on ``port`` and reset it at once, as a Redis being killed
    does to the client reconnecting to it."""
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", port))
    server.listen()
    server.settimeout(0.1)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                client, _ = server.accept()
            except TimeoutError:
                continue
            # linger 0: close sends RST, the client reads ECONNRESET
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            client.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        server.close()


@pytest.mark.parametrize("failure", ["refused", "reset"])
def test_a_broker_lost_mid_run_is_broker_unavailable(failure: str, tmp_path: Path) -> None:
    """Connected once, then Redis dies: queue_length and publish raise BrokerUnavailable
    (not redis-py's or kombu's own errors), and work again once Redis is back."""
    redis = LocalRedis(tmp_path).start()
    try:
        with Publisher(Settings(redis_url=redis.url)) as publisher:
            publisher.publish(QUEUE, [PAYLOAD])
            assert publisher.queue_length(QUEUE) == 1
            redis.kill()
            with resetting(redis.port) if failure == "reset" else nullcontext():
                with pytest.raises(BrokerUnavailable, match="broker"):
                    publisher.queue_length(QUEUE)
                with pytest.raises(BrokerUnavailable, match="broker"):
                    publisher.publish(QUEUE, [PAYLOAD])
            redis.start()  # the same port, empty: nothing was persisted
            assert publisher.queue_length(QUEUE) == 0
            publisher.publish(QUEUE, [PAYLOAD])
            assert publisher.queue_length(QUEUE) == 1
    finally:
        redis.stop()


def test_a_reconcile_pass_without_its_database_is_ledger_unavailable(redis_url: str) -> None:
    """SQLAlchemy's errors do not escape a pass: the watcher skips it and tries again."""
    engine = sa.create_engine(f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/gone")
    settings = Settings(redis_url=redis_url)
    with Publisher(settings) as publisher, pytest.raises(LedgerUnavailable, match="gone"):
        reconcile(engine, publisher, settings)
