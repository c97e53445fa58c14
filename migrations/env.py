"""Alembic environment: runs migrations on the connection ``skufleet db upgrade`` passes in."""

from alembic import context

from skufleet.schemas.ledger import create_engine
from skufleet.schemas.tables import Base

config = context.config
connection = config.attributes.get("connection")


def run(conn) -> None:  # type: ignore[no-untyped-def]
    # render_as_batch lets the same migrations ALTER tables on SQLite.
    context.configure(connection=conn, target_metadata=Base.metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


if connection is not None:
    run(connection)
else:
    url = config.get_main_option("sqlalchemy.url")
    if not url:
        raise SystemExit("no database: run migrations with `skufleet db upgrade`")
    with create_engine(url).connect() as conn:
        run(conn)
