"""The output bucket, seen from the producer side: downloads, the manifest, presigned URLs."""

from __future__ import annotations

import io
from collections.abc import Iterable
from pathlib import Path

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from skufleet.schemas.errors import StorageUnavailable
from skufleet.schemas.redact import redact_text
from skufleet.schemas.settings import Settings


class Bucket:
    """Reads and small writes on ``SKUFLEET_S3_BUCKET`` (the workers write the images)."""

    def __init__(self, settings: Settings, session: boto3.Session | None = None) -> None:
        self.name = settings.s3_bucket
        options, config = settings.s3_client_options()
        self.client = (session or boto3.Session()).client("s3", config=Config(**config), **options)

    def download(self, key: str, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.client.download_file(self.name, key, str(path))
        except (ClientError, BotoCoreError) as exc:
            raise StorageUnavailable(f"cannot download {key!r}: {redact_text(str(exc))}") from exc

    def put_lines(self, key: str, lines: Iterable[str], content_type: str) -> int:
        """Upload text lines as one object (multipart when large); returns its size."""
        buffer = io.BytesIO()
        for line in lines:
            buffer.write(line.encode("utf-8"))
        size = buffer.tell()
        buffer.seek(0)
        try:
            self.client.upload_fileobj(
                buffer, self.name, key, ExtraArgs={"ContentType": content_type}
            )
        except (ClientError, BotoCoreError) as exc:
            raise StorageUnavailable(f"cannot upload {key!r}: {redact_text(str(exc))}") from exc
        return size

    def presign(self, key: str, expires: int) -> str:
        """A URL that reads ``key`` without credentials for ``expires`` seconds."""
        return str(
            self.client.generate_presigned_url(
                "get_object", Params={"Bucket": self.name, "Key": key}, ExpiresIn=expires
            )
        )
