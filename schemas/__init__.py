"""Contracts every skufleet process shares.

Settings, the ledger's tables and state machine, task and queue names, message payloads,
object keys and the error tree. Imports only the standard library, pydantic and
SQLAlchemy: no torch, no boto3, no Celery.
"""
