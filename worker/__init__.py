"""The GPU worker: one process per device, one pinned diffusers pipeline, Celery around it.

Only ``celery_app`` and ``tasks`` touch Celery; the rest is plain Python a test can call.
"""
