"""The Alembic migrations create exactly the tables the code declares."""

from __future__ import annotations

import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory

from skufleet.migrations import DIRECTORY
from skufleet.schemas import ledger
from skufleet.schemas.tables import SCHEMA_REVISION, Base


def test_the_code_expects_the_newest_migration() -> None:
    """SCHEMA_REVISION is Alembic's head, so workers refuse outdated ledgers."""
    config = Config()
    config.set_main_option("script_location", str(DIRECTORY))
    assert ScriptDirectory.from_config(config).get_current_head() == SCHEMA_REVISION


def test_migrated_schema_matches_the_declared_tables(engine: sa.Engine) -> None:
    """No difference between the migrated database and schemas.tables, on each backend."""
    with engine.connect() as conn:
        differences = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert differences == []
    ledger.require_schema(engine)
