"""``skufleet db upgrade``: bring the ledger's tables to this code's revision with Alembic."""

from __future__ import annotations

from alembic import command
from alembic.config import Config
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError, OperationalError

from skufleet.migrations import DIRECTORY
from skufleet.schemas.errors import LedgerUnavailable, SkufleetError
from skufleet.schemas.ledger import describe


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Run the Alembic migrations up to ``revision`` on ``engine``'s database.

    A database that cannot be reached (refused, timed out, unknown host or database) is a
    :class:`LedgerUnavailable`; a migration the database refuses (permissions, a conflicting
    table) a :class:`SkufleetError`. Both name the database without its password.
    """
    config = Config()
    config.set_main_option("script_location", str(DIRECTORY))
    try:
        with engine.begin() as connection:
            config.attributes["connection"] = connection
            command.upgrade(config, revision)
    except DBAPIError as exc:
        # SQLAlchemy reports a failed connect, which has no statement, as OperationalError
        if isinstance(exc, OperationalError) and exc.statement is None:
            raise LedgerUnavailable(
                f"cannot reach the ledger at {describe(engine)}: {exc.orig}"
            ) from exc
        raise SkufleetError(f"cannot upgrade the ledger at {describe(engine)}: {exc.orig}") from exc
