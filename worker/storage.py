"""S3-compatible object storage through boto3, errors translated at this edge."""

from __future__ import annotations

import base64
import logging
from collections.abc import Mapping

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from schemas.errors import StorageUnavailable
from schemas.settings import Settings

log = logging.getLogger(__name__)


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
