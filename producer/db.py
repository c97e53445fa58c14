"""``skufleet db upgrade``: bring the ledger's tables to this code's revision with Alembic."""

from __future__ import annotations

from alembic import command
from alembic.config import Config
from sqlalchemy.engine import Engine

from migrations import DIRECTORY


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Run the Alembic migrations up to ``revision`` on ``engine``'s database."""
    config = Config()
    config.set_main_option("script_location", str(DIRECTORY))
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, revision)
