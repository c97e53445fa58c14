"""S3-compatible object storage through boto3, errors translated at this edge."""

from __future__ import annotations

import base64
import logging
from collections.abc import Mapping

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

from skufleet.schemas.errors import ConfigError, StorageRefused, StorageUnavailable
from skufleet.schemas.redact import redact_text
from skufleet.schemas.settings import Settings

log = logging.getLogger(__name__)

_SERVICE_CODES = {"403", "408", "429", "AccessDenied", "RequestTimeout", "SlowDown", "Throttling"}
"""4xx answers that mean the service, not the request, is the problem: the fleet pauses."""


def storage_error(
    exc: ClientError | BotoCoreError, what: str
) -> StorageUnavailable | StorageRefused | ConfigError:
    """The skufleet error for a boto3 failure: an outage of the service (refused, reset,
    timed out, 5xx, throttled, access denied), one request refused (another 4xx), or no
    credentials at all (a configuration error)."""
    if isinstance(exc, NoCredentialsError):
        return ConfigError(
            f"{what}: no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
            "(or a profile or instance role boto3 can find)"
        )
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        if 400 <= status < 500 and not {str(status), error.get("Code")} & _SERVICE_CODES:
            return StorageRefused(f"{what} refused: {redact_text(str(exc))}")
    return StorageUnavailable(f"{what} failed: {redact_text(str(exc))}")


class Storage:
    """The run output bucket."""

    def __init__(self, settings: Settings, session: boto3.Session | None = None) -> None:
        """``session`` carries explicit credentials; by default boto3 finds its own
        (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, profiles, instance roles)."""
        self.bucket = settings.s3_bucket
        options, config = settings.s3_client_options()
        self.client = (session or boto3.Session()).client("s3", config=Config(**config), **options)

    def ensure_bucket(self) -> None:
        """Create the bucket if it does not exist yet."""
        try:
            self.client.head_bucket(Bucket=self.bucket)
            return
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") not in ("404", "NoSuchBucket"):
                raise StorageUnavailable(
                    f"bucket {self.bucket!r}: {redact_text(str(exc))}"
                ) from exc
        except BotoCoreError as exc:
            raise storage_error(exc, f"bucket {self.bucket!r}") from exc
        log.info("creating bucket %s", self.bucket)
        try:
            self.client.create_bucket(Bucket=self.bucket)
        except self.client.exceptions.BucketAlreadyOwnedByYou:
            pass
        except (ClientError, BotoCoreError) as exc:
            raise StorageUnavailable(
                f"cannot create bucket {self.bucket!r}: {redact_text(str(exc))}"
            ) from exc

    def put(
        self,
        key: str,
        body: bytes,
        *,
        sha256_hex: str,
        content_type: str,
        metadata: Mapping[str, str],
    ) -> None:
        """Upload ``body``; the server checks it against ``sha256_hex``, refusing corrupt copies."""
        try:
            self.client.put_object(
                Bucket=self.bucket,
                Key=key,
                Body=body,
                ContentType=content_type,
                Metadata=dict(metadata),
                ChecksumSHA256=base64.b64encode(bytes.fromhex(sha256_hex)).decode(),
            )
        except (ClientError, BotoCoreError) as exc:
            raise storage_error(exc, f"upload of {key!r}") from exc

    def probe(self) -> None:
        """The cheapest request that proves the bucket answers; raises StorageUnavailable."""
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except (ClientError, BotoCoreError) as exc:
            raise StorageUnavailable(f"bucket {self.bucket!r}: {redact_text(str(exc))}") from exc
