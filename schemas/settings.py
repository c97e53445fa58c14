"""Settings: one object per process, read from ``SKUFLEET_*`` variables at the entry point.

Credentials are not settings: boto3 reads ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``
itself, and Redis or PostgreSQL passwords live inside their URLs, so no secret is ever
copied into an object that might be logged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"


class Settings(BaseSettings):
    """Everything a skufleet process needs to know about its surroundings."""

    model_config = SettingsConfigDict(env_prefix="SKUFLEET_", extra="ignore", frozen=True)

    redis_url: str = "redis://127.0.0.1:6379/0"
    """Celery broker."""
    database_url: str = "sqlite:///skufleet.db"
    """SQL ledger (SQLAlchemy URL). ``postgresql://`` uses psycopg 3."""
    s3_endpoint_url: str | None = None
    """S3 endpoint; empty or unset means AWS itself."""
    s3_bucket: str = "skufleet"
    s3_region: str = "us-east-1"
    s3_max_attempts: int = Field(default=5, ge=1, le=20)
    """Tries per S3 request (boto3 standard retry mode, exponential backoff between them)."""
    model: str = DEFAULT_MODEL
    """Diffusers model id or local path; ``tiny`` is the built-in random test pipeline."""
    queue_prefix: str = Field(default="skufleet", pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    """Prefix of every queue name, so that several fleets can share one Redis."""
    max_attempts: int = Field(default=3, ge=1, le=100)
    """Renders an item may start before it is failed for good."""
    lease_seconds: int = Field(default=900, ge=1)
    """How long a claimed item belongs to its worker: the longest a batch may take. Past it,
    the reconciler hands the item to another worker and the first one's result is refused."""
    visibility_timeout: int = Field(default=7200, ge=1)
    """Seconds Redis waits for an ack before redelivering a message; a worker refuses to start
    unless it is above the lease."""
    retry_backoff_seconds: float = Field(default=5.0, ge=0)
    """First retry delay of a failed batch; doubles with every attempt."""
    reconcile_seconds: float = Field(default=60.0, gt=0)
    """How often the reconciler (beat task or ``skufleet reconcile --watch``) runs."""
    lost_after_seconds: int = Field(default=900, ge=1)
    """A queued item whose queue has been empty this long lost its message (a broker restart,
    a flush) and is published again."""
    flower_basic_auth: SecretStr | None = None
    """``user:password[,user:password]`` for Flower; ``skufleet flower`` refuses to start
    without it unless bound to the loopback address."""
    webhook_url: str | None = None
    """Called (POST, JSON) with a run's totals when its last item is done."""
    cache_dir: Path = Path.home() / ".cache" / "skufleet"
    """Where the built-in ``tiny`` pipeline is written once and loaded from."""

    @field_validator("s3_endpoint_url", "webhook_url", "flower_basic_auth", mode="before")
    @classmethod
    def _empty_means_unset(cls, value: object) -> object:
        return None if value == "" else value

    def s3_client_options(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """``(client keyword arguments, botocore Config keyword arguments)`` for boto3, so
        every process builds its S3 client the same way without this module importing boto3."""
        return (
            {"endpoint_url": self.s3_endpoint_url, "region_name": self.s3_region},
            {
                # standard mode retries throttling, 5xx and dropped connections with backoff
                "retries": {"mode": "standard", "max_attempts": self.s3_max_attempts},
                "connect_timeout": 5,
                "read_timeout": 60,
                # S3-compatible servers (MinIO, SeaweedFS) are addressed by path, not DNS
                "s3": {"addressing_style": "path" if self.s3_endpoint_url else "auto"},
            },
        )
