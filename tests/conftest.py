"""Fixtures that give tests real services: PostgreSQL and SQLite ledgers, Redis, an S3 server.

A missing service fails the test run; nothing here is skipped for want of one.
Redis is shared, so every test gets its own queue prefix; PostgreSQL gives every test its
own database; the S3 server (SeaweedFS) is private to the session and every test gets its
own bucket.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import sqlalchemy as sa

from skufleet.producer.db import upgrade
from skufleet.producer.services import LocalS3
from skufleet.schemas import ledger
from skufleet.schemas.settings import Settings
from tests.fleet import POSTGRES_ADMIN_URL, REDIS_URL, ROOT, Fleet

SERVICE_FIXTURES = frozenset(
    {"redis_url", "postgres_url", "database_url", "engine", "s3", "fleet", "fleet_args"}
)
"""A test that uses any of these needs a running service; the others run in `make check`."""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test that needs a service (by the fixtures it uses) ``services``, so the
    fast tier (`make check`) is ``-m "not services"`` and cannot miss one."""
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        if fixtures & SERVICE_FIXTURES or any(
            item.get_closest_marker(name) for name in ("integration", "faults")
        ):
            item.add_marker(pytest.mark.services)


@pytest.fixture(scope="session")
def redis_url() -> str:
    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=3).ping()
    except redis.RedisError as exc:
        pytest.fail(f"Redis is required at {REDIS_URL} (SKUFLEET_TEST_REDIS_URL): {exc}")
    return REDIS_URL


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh PostgreSQL database for one test, dropped afterwards."""
    name = f"skufleet_test_{secrets.token_hex(6)}"
    admin = sa.create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    except sa.exc.OperationalError as exc:
        pytest.fail(f"PostgreSQL is required at {POSTGRES_ADMIN_URL}: {exc}")
    yield sa.make_url(POSTGRES_ADMIN_URL).set(database=name).render_as_string(False)
    with admin.connect() as conn:
        conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin.dispose()


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """A test that asks for ``database_url`` runs against PostgreSQL and SQLite, unless it
    (or its module) is marked ``postgresql_only`` or parametrizes the backend itself."""
    if "database_url" not in metafunc.fixturenames:
        return
    for mark in metafunc.definition.iter_markers("parametrize"):
        if "database_url" in str(mark.args[0]):
            return
    one = metafunc.definition.get_closest_marker("postgresql_only") is not None
    metafunc.parametrize(
        "database_url", ["postgresql"] if one else ["postgresql", "sqlite"], indirect=True
    )


@pytest.fixture
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The ledger's URL for one backend (see pytest_generate_tests)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'ledger.db'}"
    return str(request.getfixturevalue("postgres_url"))


@pytest.fixture
def engine(database_url: str) -> Iterator[sa.Engine]:
    """A ledger engine with the tables created by the real migrations."""
    engine = ledger.create_engine(database_url)
    upgrade(engine)
    yield engine
    engine.dispose()


@pytest.fixture(scope="session")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalS3]:
    server = LocalS3(tmp_path_factory.mktemp("s3")).start()
    yield server
    server.stop()


@pytest.fixture
def worker_settings(s3: LocalS3, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """Settings of a worker storing in a fresh bucket of the session's S3 server (its keys
    in the environment, where boto3 reads them): two attempts, retries at once."""
    for key, value in s3.env().items():
        monkeypatch.setenv(key, value)
    return Settings(
        s3_endpoint_url=s3.endpoint_url,
        s3_bucket=f"t-{secrets.token_hex(6)}",
        max_attempts=2,
        retry_backoff_seconds=0,
    )


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache directory holding the tiny pipeline, built once for the session."""
    from skufleet.worker import tiny

    cache = tmp_path_factory.mktemp("models")
    tiny.ensure(cache)
    return cache


@pytest.fixture
def fleet(
    database_url: str, redis_url: str, s3: LocalS3, model_cache: Path, tmp_path: Path
) -> Fleet:
    bucket = f"test-{secrets.token_hex(6)}"
    env = {
        **os.environ,
        **s3.env(),
        "SKUFLEET_DATABASE_URL": database_url,
        "SKUFLEET_REDIS_URL": redis_url,
        "SKUFLEET_S3_BUCKET": bucket,
        "SKUFLEET_QUEUE_PREFIX": f"test-{secrets.token_hex(6)}",
        "SKUFLEET_CACHE_DIR": str(model_cache),
        "SKUFLEET_RETRY_BACKOFF_SECONDS": "0.5",
        "PYTHONPATH": str(ROOT),  # worker processes import tests.fixtures
    }
    return Fleet(env=env, s3=s3, bucket=bucket, tmp_path=tmp_path)
