"""S3-compatible object storage through boto3, errors translated at this edge."""

from __future__ import annotations

import base64
import logging
from collections.abc import Mapping
from dataclasses import dataclass

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from schemas.errors import StorageUnavailable
from schemas.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StoredObject:
    key: str
    size: int
    sha256: str


class Storage:
    """The run output bucket."""

    def __init__(self, settings: Settings, session: boto3.Session | None = None) -> None:
        """``session`` carries explicit credentials; by default boto3 finds its own
        (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, profiles, instance roles)."""
        self.bucket = settings.s3_bucket
        config = Config(
            # standard mode retries throttling, 5xx and dropped connections with backoff.
            retries={"mode": "standard", "max_attempts": settings.s3_max_attempts},
            connect_timeout=5,
            read_timeout=60,
            # S3-compatible servers (MinIO, SeaweedFS) are addressed by path, not DNS.
            s3={"addressing_style": "path" if settings.s3_endpoint_url else "auto"},
        )
        self.client = (session or boto3.Session()).client(
            "s3",
            endpoint_url=settings.s3_endpoint_url,
            region_name=settings.s3_region,
            config=config,
        )

    def ensure_bucket(self) -> None:
        """Create the bucket if it does not exist yet."""
        try:
            self.client.head_bucket(Bucket=self.bucket)
            return
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") not in ("404", "NoSuchBucket"):
                raise StorageUnavailable(f"bucket {self.bucket!r}: {exc}") from exc
        except BotoCoreError as exc:
            raise StorageUnavailable(f"bucket {self.bucket!r}: {exc}") from exc
        log.info("creating bucket %s", self.bucket)
        try:
            self.client.create_bucket(Bucket=self.bucket)
        except self.client.exceptions.BucketAlreadyOwnedByYou:
            pass
        except (ClientError, BotoCoreError) as exc:
            raise StorageUnavailable(f"cannot create bucket {self.bucket!r}: {exc}") from exc

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
            raise StorageUnavailable(f"upload of {key!r} failed: {exc}") from exc
