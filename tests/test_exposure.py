"""What the deployment exposes: Flower's login, the workers' metrics address, and what a kept
demo leaves on disk and is willing to signal."""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import time
from pathlib import Path

import pytest

from skufleet.producer import demo
from skufleet.producer.flower import MIN_PASSWORD, authorized, parse_basic_auth
from skufleet.producer.services import free_port, wait_until
from skufleet.schemas.errors import ConfigError
from skufleet.worker import metrics
from tests.fleet import BIN, Fleet, postgres_only

# --- Flower's login ------------------------------------------------------------------------


def skufleet(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "skufleet"), *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    ("login", "password", "reason"),
    [
        ("ops:Short-pass1", "Short-pass1", "needs at least 12"),
        ("ops-and-no-colon-Secret-9999", "no-colon-Secret-9999", "no ':'"),
        (":An-empty-user-0000", "An-empty-user-0000", "empty user"),
        ("ops:Long-enough-pass-1,audit:Tiny-pass", "Tiny-pass", "pair 2 of 2"),
    ],
)
def test_flower_refuses_a_malformed_login_in_one_line_that_hides_the_password(
    tmp_path: Path, redis_url: str, login: str, password: str, reason: str
) -> None:
    """A short password, a missing colon, an empty user: `skufleet flower` exits 2 with one
    error line naming the problem and never printing the password."""
    env = {
        **os.environ,
        "SKUFLEET_REDIS_URL": redis_url,
        "SKUFLEET_CACHE_DIR": str(tmp_path / "cache"),
        "SKUFLEET_FLOWER_BASIC_AUTH": login,
    }
    result = skufleet(
        "flower", "--address", "0.0.0.0", "--port", str(free_port()), env=env, cwd=tmp_path
    )
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and reason in result.stderr
    assert password not in result.stdout + result.stderr


def test_a_well_formed_login_is_flowers_list_of_pairs() -> None:
    """Comma-separated user:password pairs come back as Flower's list, a password may hold
    colons, and 12 characters is enough."""
    assert parse_basic_auth("ops:" + "p" * MIN_PASSWORD + ",audit:a:b:c-d-e-f-g-h") == [
        "ops:" + "p" * MIN_PASSWORD,
        "audit:a:b:c-d-e-f-g-h",
    ]
    with pytest.raises(ConfigError):
        parse_basic_auth("ops:" + "p" * (MIN_PASSWORD - 1))


def basic(credentials: str) -> str:
    return "Basic " + base64.b64encode(credentials.encode()).decode()


@pytest.mark.parametrize(
    "header",
    [
        "",
        "Bearer abc",
        basic("ops:wrong-password-1"),
        basic("ops:Right-password-1x"),  # a longer one that begins with the right one
        "Basic not*base64",
        "Basic " + base64.b64encode("ops:Ríght-password-1".encode()).decode(),
    ],
)
def test_only_a_listed_login_is_authorized(header: str) -> None:
    """Missing, other-scheme, wrong, padded, undecodable or non-ASCII credentials are refused
    (as a 401, never an error); the listed pair is accepted."""
    credentials = ["audit:Another-pass-22", "ops:Right-password-1"]
    assert not authorized(header, credentials)
    assert authorized(basic("ops:Right-password-1"), credentials)


# --- the workers' metrics ------------------------------------------------------------------


def listening(port: int) -> set[str]:
    """Addresses with a TCP socket listening on ``port``, from /proc/net/tcp and tcp6."""
    found = set()
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, _, hex_port = local.partition(":")
            if state != "0A" or int(hex_port, 16) != port:
                continue
            raw = bytes.fromhex(address)
            if width == 8:
                found.add(socket.inet_ntop(socket.AF_INET, raw[::-1]))
            else:  # four little-endian 32-bit words
                words = b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))
                found.add(socket.inet_ntop(socket.AF_INET6, words))
    return found


def test_worker_metrics_listen_on_loopback_unless_told_otherwise() -> None:
    """A worker's metrics server binds 127.0.0.1 by default, and the given address when one
    is given."""
    port = free_port()
    server = metrics.serve(port)
    try:
        assert server.server_address[0] == "127.0.0.1"
        assert listening(port) == {"127.0.0.1"}
    finally:
        server.shutdown()
        server.server_close()
    other = free_port()
    server = metrics.serve(other, "0.0.0.0")
    try:
        assert listening(other) == {"0.0.0.0"}
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.integration
@postgres_only
def test_skufleet_worker_serves_each_devices_metrics_on_loopback_only(fleet: Fleet) -> None:
    """`skufleet-worker --metrics-port P` passes the loopback default down to its worker
    processes: the device's metrics listen on 127.0.0.1:P and on no other address."""
    assert fleet.cli("db", "upgrade").returncode == 0
    port = free_port()
    with fleet.background(
        str(BIN / "skufleet-worker"),
        "--model",
        "tiny",
        "--devices",
        "cpu",
        "--metrics-port",
        str(port),
    ):
        wait_until(lambda: bool(listening(port)), 120, "the worker's metrics")
        time.sleep(0.5)
        assert listening(port) == {"127.0.0.1"}


# --- the kept demo: what --stop may signal -------------------------------------------------


def sleeper() -> subprocess.Popen[bytes]:
    """An unrelated process, leading its own process group as the demo's processes do; it
    is returned once /proc shows it as ``sleep 60`` (on a busy machine that can lag)."""
    process = subprocess.Popen(["sleep", "60"], start_new_session=True)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        found = demo.identity(process.pid)
        if found is not None and found.cmdline == ["sleep", "60"]:
            return process
        time.sleep(0.05)
    process.kill()
    raise AssertionError("sleep 60 did not start")


def stop_demo(directory: Path, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SKUFLEET_", "AWS_"))}
    return skufleet("demo", "--stop", "--dir", str(directory), env=env, cwd=tmp_path)


def write_stack(directory: Path, pid: int, start: int, cmdline: list[str]) -> None:
    directory.mkdir(exist_ok=True)
    entry = {"pid": pid, "start": start, "cmdline": cmdline, "grace": 1}
    # "pids" too: the shape of stack.json before processes were recorded with their identity
    (directory / "stack.json").write_text(
        json.dumps({"pids": [pid], "processes": [entry], "env": {}, "flower": ""})
    )


@pytest.mark.parametrize("forged", ["start time", "command line"])
def test_demo_stop_leaves_a_process_it_cannot_prove_is_its_own_alone(
    tmp_path: Path, forged: str
) -> None:
    """A stack.json whose pid now belongs to another process (another start time: a recycled
    pid; another command line: a hand-edited file) makes --stop leave it alone and say so in
    one line."""
    process = sleeper()
    try:
        real = demo.identity(process.pid)
        assert real is not None
        if forged == "start time":
            write_stack(tmp_path / "demo", process.pid, real.start - 1, real.cmdline)
        else:
            write_stack(tmp_path / "demo", process.pid, real.start, ["redis-server", "--port", "1"])
        result = stop_demo(tmp_path / "demo", tmp_path)
        time.sleep(0.5)
        assert process.poll() is None, "the unrelated process was signalled"
        refusals = [line for line in result.stderr.splitlines() if "alone" in line]
        assert len(refusals) == 1 and f"pid {process.pid}" in refusals[0]
        assert result.returncode == 1
        assert "stopped 0 processes" in result.stdout
    finally:
        process.kill()
        process.wait()


def test_demo_stop_stops_a_process_whose_start_time_and_command_line_match(
    tmp_path: Path,
) -> None:
    """A process still the one recorded (same pid, start time and command line) is stopped,
    with its whole process group."""
    process = sleeper()
    try:
        real = demo.identity(process.pid)
        assert real is not None
        write_stack(tmp_path / "demo", process.pid, real.start, real.cmdline)
        result = stop_demo(tmp_path / "demo", tmp_path)
        assert result.returncode == 0, result.stderr
        assert process.wait(10) == -15
        assert "stopped 1 processes" in result.stdout
        assert not (tmp_path / "demo" / "stack.json").exists()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
