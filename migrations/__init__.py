"""Alembic migrations of the skufleet ledger; run them with ``skufleet db upgrade``."""

from pathlib import Path

DIRECTORY = Path(__file__).resolve().parent
