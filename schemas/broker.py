"""The Celery settings every skufleet app shares, written once.

Three apps open the broker: the workers' (``worker.celery_app.create_app``), the producer's
publisher (``producer.publish.Publisher``) and Flower's (``producer.flower.celery_app``).
Each starts from :func:`celery_settings` and adds only what is its own (the worker's acks,
prefetch and transport). Plain data, no Celery import, so that both sides may read it here.
"""

from __future__ import annotations

from typing import Any

from skufleet.schemas.settings import Settings


def celery_settings(settings: Settings) -> dict[str, Any]:
    """The ``app.conf`` values every skufleet Celery app has; each carries why."""
    return {
        # JSON only: a pickle message could run arbitrary code on a GPU machine. (Remote
        # control, Flower's included, is serialised as tasks are; events by their own.)
        "task_serializer": "json",
        "accept_content": ["json"],
        "event_serializer": "json",
        # Redis hands an unacked message to another worker after this many seconds; it
        # must exceed the longest batch or a batch still rendering is rendered twice. Every
        # app that opens the broker carries it, so none falls back to kombu's one hour.
        "broker_transport_options": {"visibility_timeout": settings.visibility_timeout},
        # A broker that is still starting (or restarting) is retried on the first
        # connection as on later ones, instead of failing the process at once.
        "broker_connection_retry_on_startup": True,
    }
