"""Settings: one object per process, read from ``SKUFLEET_*`` variables at the entry point.

Credentials are not settings: boto3 reads ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``
itself, and Redis or PostgreSQL passwords live inside their URLs, so no secret is ever
copied into an object that might be logged. URLs are checked here for what can be checked
without connecting (scheme, host, port, database driver), and no message about one repeats
it: the URL may hold a password (``schemas.redact`` shows URLs safely).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import SplitResult, urlsplit

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from skufleet.schemas.errors import ConfigError

DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"

REDIS_SCHEMES = ("redis", "rediss", "redis+socket")
"""What Celery's Redis transport (kombu) reads: TCP, TLS, and a Unix socket
(``redis+socket:///run/redis.sock``; kombu has no ``unix://``)."""
DATABASE_DRIVERS = ("postgresql", "postgresql+psycopg", "postgres", "sqlite", "sqlite+pysqlite")
"""The ledger's SQLAlchemy drivers: PostgreSQL through psycopg 3 (the one installed) and
SQLite; ``postgresql://`` and ``postgres://`` mean psycopg 3 (``ledger.create_engine``)."""
SUPPORTED_DATABASES = "postgresql://USER:PASSWORD@HOST/DB (psycopg 3) or sqlite:///PATH"


def _split(value: str) -> SplitResult:
    """``value`` split as a URL; a port that is not a number 0-65535 is refused here, in
    words that do not repeat the URL (what looks like a port may be half a password)."""
    if any(ord(char) <= 32 or ord(char) == 127 for char in value):
        # urlsplit drops tabs and newlines silently; a client library might not
        raise ValueError("malformed URL: it holds a space or a control character")
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 -- parses the port
    except ValueError:
        raise ValueError("malformed URL: its host or port cannot be read") from None
    return parts


def _http_url(value: str, what: str) -> None:
    parts = _split(value)
    if parts.scheme not in ("http", "https"):
        given = f", not {parts.scheme}://" if parts.scheme else ""
        raise ValueError(f"{what} must be an http:// or https:// URL{given}")
    if not parts.hostname:
        raise ValueError(f"{what} has no host")


class Settings(BaseSettings):
    """Everything a skufleet process needs to know about its surroundings."""

    model_config = SettingsConfigDict(env_prefix="SKUFLEET_", extra="ignore", frozen=True)

    redis_url: str = "redis://127.0.0.1:6379/0"
    """Celery broker: ``redis://``, ``rediss://`` (TLS) or ``redis+socket://``."""
    database_url: str = "sqlite:///skufleet.db"
    """SQL ledger (SQLAlchemy URL): PostgreSQL (``postgresql://`` uses psycopg 3) or SQLite."""
    s3_endpoint_url: str | None = None
    """S3 endpoint, ``http(s)://host[:port]``; empty or unset means AWS itself."""
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
    """``http(s)://`` URL called (POST, JSON) with a run's totals when its last item is done."""
    webhook_secret: SecretStr | None = None
    """Key of the ``X-Skufleet-Signature: sha256=<hex>`` header (HMAC-SHA256 of the exact
    body) on every webhook call; unset or empty, calls go unsigned, with a warning."""
    cache_dir: Path = Path.home() / ".cache" / "skufleet"
    """Where the built-in ``tiny`` pipeline is written once and loaded from."""
    label_font: Path | None = None
    """A font file (TrueType, OpenType or a .ttc collection's first face) that labels are
    drawn with first; characters it lacks come from the fonts that ship with skufleet."""

    quality_clip: str | None = None
    """A CLIP model (hub id or local path; ``tiny-clip`` builds a tiny random one) that
    scores each image against its prompt, the quality gate's ``clip`` check; unset, the
    check is off."""

    @field_validator(
        "s3_endpoint_url",
        "webhook_url",
        "flower_basic_auth",
        "label_font",
        "quality_clip",
        mode="before",
    )
    @classmethod
    def _empty_means_unset(cls, value: object) -> object:
        return None if value == "" else value

    @field_validator("redis_url")
    @classmethod
    def _broker_url(cls, value: str) -> str:
        parts = _split(value)
        if parts.scheme not in REDIS_SCHEMES:
            raise ValueError(
                f"scheme {parts.scheme!r} is not redis, rediss or redis+socket "
                "(redis+socket:///PATH for a Unix socket)"
            )
        if parts.scheme == "redis+socket" and not parts.path:
            raise ValueError("a redis+socket:// URL needs the socket's path")
        return value  # no host is localhost, as Celery reads it

    @field_validator("database_url")
    @classmethod
    def _ledger_url(cls, value: str) -> str:
        try:
            url = make_url(value)
        except (ArgumentError, ValueError):
            raise ValueError(f"not a database URL: use {SUPPORTED_DATABASES}") from None
        if url.drivername not in DATABASE_DRIVERS:
            raise ValueError(
                f"database driver {url.drivername!r} is not supported: use {SUPPORTED_DATABASES}"
            )
        return value

    @field_validator("s3_endpoint_url")
    @classmethod
    def _endpoint_url(cls, value: str | None) -> str | None:
        if value is not None:
            _http_url(value, "the S3 endpoint")
            if urlsplit(value).query or urlsplit(value).fragment:
                raise ValueError("the S3 endpoint takes no query string or fragment")
        return value

    @field_validator("webhook_url")
    @classmethod
    def _hook_url(cls, value: str | None) -> str | None:
        if value is not None:
            _http_url(value, "the webhook")
        return value

    @field_validator("label_font")
    @classmethod
    def _font_file(cls, value: Path | None) -> Path | None:
        if value is None:
            return None
        if not value.is_file():
            raise ValueError(f"{value} is not a file")
        from PIL import ImageFont  # only where a font is configured

        try:
            ImageFont.truetype(str(value), 12)
        except OSError as exc:
            raise ValueError(f"{value} is not a font file FreeType can read ({exc})") from None
        return value

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
                # SigV4 for every request and presigned URL: AWS refuses SigV2 for buckets
                # created since 2020, and downstream systems get URLs that work everywhere
                "signature_version": "s3v4",
            },
        )


def load_settings(**overrides: Any) -> Settings:
    """The settings of this process, from ``SKUFLEET_*`` (``overrides`` win).

    An invalid value is a :class:`ConfigError` whose message is one line naming each bad
    variable: ``invalid setting SKUFLEET_REDIS_URL: scheme 'http' is not redis, …``.
    pydantic's own message would repeat the value, and a URL's value holds its password.
    """
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        raise ConfigError(describe_invalid(exc)) from None


def describe_invalid(exc: ValidationError) -> str:
    """One line naming each invalid setting and why, without its value."""
    problems = []
    for error in exc.errors(include_input=False, include_url=False):
        field = str(error["loc"][0]) if error["loc"] else "settings"
        message = error["msg"].removeprefix("Value error, ")
        problems.append(f"invalid setting SKUFLEET_{field.upper()}: {message}")
    return "; ".join(problems)
