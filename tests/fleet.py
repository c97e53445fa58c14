"""Test helpers: where the test services are, and :class:`Fleet`, the environment and
commands that drive real skufleet processes against them (integration and fault tests).

Fixtures live in ``conftest.py``; everything they and the tests share lives here.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from skufleet.producer.services import LocalS3, spawn_group, stop_group
from skufleet.schemas import ledger
from skufleet.schemas.settings import Settings

REDIS_URL = os.environ.get("SKUFLEET_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
POSTGRES_ADMIN_URL = os.environ.get(
    "SKUFLEET_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"

postgres_only = pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
"""For process-level tests that exercise something other than the ledger."""


@dataclass
class Fleet:
    """Environment and helpers to drive real skufleet processes against real services."""

    env: dict[str, str]
    s3: LocalS3
    bucket: str
    tmp_path: Path

    @property
    def settings(self) -> Settings:
        return Settings(
            **{
                key.removeprefix("SKUFLEET_").lower(): value
                for key, value in self.env.items()
                if key.startswith("SKUFLEET_")
            }
        )

    def run(self, *command: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            command,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=self.tmp_path,
        )

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.run(str(BIN / "skufleet"), *args)

    @contextlib.contextmanager
    def background(
        self, *command: str, env: dict[str, str] | None = None, grace: float = 20
    ) -> Iterator[subprocess.Popen[bytes]]:
        """A long-running process (a server, a listening worker) in its own process group,
        stopped with SIGTERM when the block ends; one that takes longer than ``grace``
        seconds to stop is killed, and fails the test."""
        started = len(list(self.tmp_path.glob("*.log")))
        log = self.tmp_path / f"{Path(command[0]).name}-{started}.log"
        process = spawn_group(command, log=log, env=env or self.env, cwd=self.tmp_path)
        try:
            yield process
        finally:
            stopped = stop_group(process, grace)
        tail = log.read_text(errors="replace")[-4000:] if log.exists() else ""
        assert stopped, f"{command[0]} did not stop within {grace}s of SIGTERM; its log:\n{tail}"

    def cli_json(self, *args: str) -> dict[str, Any]:
        result = self.cli(*args)
        assert result.returncode == 0, f"skufleet {' '.join(args)} failed:\n{result.stderr}"
        return dict(json.loads(result.stdout))

    def worker(self, *args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
        return self.run(str(BIN / "skufleet-worker"), *args, timeout=timeout)

    def engine(self) -> sa.Engine:
        return ledger.create_engine(self.env["SKUFLEET_DATABASE_URL"])

    def objects(self, prefix: str) -> dict[str, dict[str, Any]]:
        """Every image under ``prefix`` (the run's manifest and its summary aside): key →
        list entry."""
        client = self.s3.client()
        found: dict[str, dict[str, Any]] = {}
        for page in client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=prefix
        ):
            found.update(
                {
                    entry["Key"]: entry
                    for entry in page.get("Contents", [])
                    if not entry["Key"].endswith(("/manifest.jsonl", "/manifest.json"))
                }
            )
        return found

    def manifest(self, run: str) -> list[dict[str, Any]]:
        """The manifest the run's completion wrote to the bucket."""
        body, _ = self.read_object(f"{run}/manifest.jsonl")
        return [json.loads(line) for line in body.decode().splitlines()]

    def read_object(self, key: str) -> tuple[bytes, dict[str, Any]]:
        response = self.s3.client().get_object(Bucket=self.bucket, Key=key)
        return response["Body"].read(), response
