"""What operations staff and downstream systems use: Flower behind auth, metrics, presigned
URLs, one-off generation, and the one-command demo."""

from __future__ import annotations

import base64
import csv
import json
import os
import shlex
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import sqlalchemy as sa

from skufleet.producer.services import free_port, wait_until
from tests.fleet import BIN, EXAMPLES, Fleet, postgres_only

pytestmark = pytest.mark.integration


def get(url: str, auth: tuple[str, str] | None = None) -> tuple[int, bytes]:
    headers = {}
    if auth is not None:
        headers["Authorization"] = "Basic " + base64.b64encode(":".join(auth).encode()).decode()
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=5) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def listening(url: str) -> bool:
    try:
        get(url)
    except OSError:
        return False
    return True


@postgres_only
def test_flower_asks_for_credentials_on_every_endpoint(fleet: Fleet) -> None:
    """Flower bound to every address (0.0.0.0, reached here through 127.0.0.1) answers 401
    without credentials or with wrong ones on every page, API call, /metrics and
    /healthcheck, and 200 with them. Without SKUFLEET_FLOWER_BASIC_AUTH it refuses to
    listen beyond the loopback address."""
    refused = fleet.cli("flower", "--address", "0.0.0.0")
    assert refused.returncode == 2 and "without authentication" in refused.stderr
    port = free_port()
    auth = ("ops", "s3cret-Flower-pass")
    env = {**fleet.env, "SKUFLEET_FLOWER_BASIC_AUTH": ":".join(auth)}
    base = f"http://127.0.0.1:{port}"
    command = ("flower", "--address", "0.0.0.0", "--port", str(port))
    with fleet.background(str(BIN / "skufleet"), *command, env=env):
        wait_until(lambda: listening(base), 60, "Flower")
        for path in ("/", "/workers", "/tasks", "/api/workers", "/api/tasks"):
            assert get(base + path)[0] == 401, path
            assert get(base + path, ("ops", "wrong"))[0] == 401, path
        for path in ("/metrics", "/healthcheck", "/static/css/flower.css", "/no-such-page"):
            assert get(base + path)[0] == 401, path
        for path in ("/", "/api/workers", "/metrics", "/healthcheck"):
            assert get(base + path, auth)[0] == 200, path


def small_catalogue(fleet: Fleet, rows: int = 3) -> str:
    """The first ``rows`` products of the example catalogue (two shots each)."""
    lines = (EXAMPLES / "catalogue.csv").read_text().splitlines()
    path = fleet.tmp_path / "small.csv"
    path.write_text("\n".join(lines[: rows + 1]) + "\n")
    return str(path)


@postgres_only
def test_metrics_show_queues_items_and_device_rates(fleet: Fleet) -> None:
    """The metrics endpoint reports queue depth per model queue and items by status per run;
    a worker serves counters of its device for rate(): images, busy seconds, per-image
    seconds (the exporter no longer computes rates of its own)."""
    assert fleet.cli("db", "upgrade").returncode == 0
    fleet.cli_json(
        "enqueue", small_catalogue(fleet, 4), "--run", "m", "--model", "tiny",
        "--batch-size", "4", "--json",
    )  # fmt: skip
    port = free_port()
    url = f"http://127.0.0.1:{port}/metrics"
    with fleet.background(str(BIN / "skufleet"), "metrics", "--port", str(port)):
        wait_until(lambda: listening(url), 60, "the metrics endpoint")
        text = get(url)[1].decode()
        queue = f'skufleet_queue_messages{{model="tiny",queue="{fleet.settings.queue_prefix}'
        assert f'{queue}.render.tiny"}} 2.0' in text  # 8 items in messages of 4
        assert 'skufleet_items{run="m",status="queued"} 8.0' in text
        worker_port = free_port()
        worker_url = f"http://127.0.0.1:{worker_port}/metrics"
        worker = ("--model", "tiny", "--devices", "cpu", "--metrics-port", str(worker_port))
        with fleet.background(str(BIN / "skufleet-worker"), *worker, grace=60):
            done = 'skufleet_items{run="m",status="succeeded"} 8.0'
            wait_until(lambda: done in get(url)[1].decode(), 180, "the run to be drawn")
            drawn = get(worker_url)[1].decode()
        text = get(url)[1].decode()
        assert f'{queue}.render.tiny"}} 0.0' in text
        assert 'skufleet_worker_images_total{device="cpu"} 8.0' in drawn
        assert 'skufleet_worker_render_seconds_count{device="cpu"} 8.0' in drawn
        assert 'skufleet_worker_device_busy_seconds_total{device="cpu"}' in drawn
        assert "skufleet_images_per_second" not in text + drawn


@postgres_only
def test_presigned_urls_read_the_private_bucket_without_credentials(fleet: Fleet) -> None:
    """`skufleet presign` gives one URL per image; a plain HTTP GET of it returns the very
    bytes the ledger recorded, while the same object without a signature is refused."""
    assert fleet.cli("db", "upgrade").returncode == 0
    fleet.cli_json("enqueue", small_catalogue(fleet), "--run", "p", "--model", "tiny", "--json")
    assert fleet.worker("--model", "tiny", "--devices", "cpu", "--burst").returncode == 0
    result = fleet.cli("presign", "p", "--expires", "600")
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(records) == 6
    # SigV4 (AWS refuses the old scheme for buckets made since 2020), not SigV2's Signature=
    assert all("X-Amz-Algorithm=AWS4-HMAC-SHA256" in r["url"] for r in records)
    assert not any("&Signature=" in r["url"] or "?Signature=" in r["url"] for r in records)
    listed = fleet.cli("manifest", "p")
    manifest = {r["key"]: r for r in map(json.loads, listed.stdout.splitlines())}
    for record in records[:5]:
        status, body = get(record["url"])
        assert status == 200 and len(body) == manifest[record["key"]]["bytes"]
    assert get(f"{fleet.s3.endpoint_url}/{fleet.bucket}/{records[0]['key']}")[0] in (401, 403)


@postgres_only
def test_generate_queues_a_prompt_waits_and_saves_the_images(fleet: Fleet) -> None:
    """`skufleet generate "…" -n 3 --seed 5` goes through the fleet and saves three images,
    drawn with seeds 5, 6 and 7."""
    assert fleet.cli("db", "upgrade").returncode == 0
    out = fleet.tmp_path / "out"
    worker = (str(BIN / "skufleet-worker"), "--model", "tiny", "--devices", "cpu")
    with fleet.background(*worker, grace=60):
        result = fleet.run(
            str(BIN / "skufleet"),
            "generate",
            "a red enamel mug",
            "-n",
            "3",
            "--seed",
            "5",
            "--model",
            "tiny",
            "--out",
            str(out),
            timeout=180,
        )
    assert result.returncode == 0, result.stderr[-3000:]
    paths = [Path(line) for line in result.stdout.split()]
    assert len(paths) == 3 and all(p.exists() and p.parent == out for p in paths)
    from skufleet.worker.postprocess import read_metadata

    assert sorted(read_metadata(p.read_bytes())["seed"] for p in paths) == ["5", "6", "7"]
    assert all(read_metadata(p.read_bytes())["prompt"] == "a red enamel mug" for p in paths)


def demo(
    tmp_path: Path, *args: str, configured: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """`skufleet demo ARGS --dir tmp_path/demo` with nothing configured but ``configured``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SKUFLEET_", "AWS_"))}
    env["SKUFLEET_CACHE_DIR"] = str(tmp_path / "cache")
    env.update(configured or {})
    return subprocess.run(
        [str(BIN / "skufleet"), "demo", *args, "--dir", str(tmp_path / "demo")],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_the_demo_renders_everything_and_leaves_no_process(
    tmp_path: Path, postgres_url: str
) -> None:
    """`skufleet demo --use-configured` with a ledger configured: it says it uses (and
    upgrades) that ledger and starts the missing Redis and S3 itself, with Flower and a
    worker; the example catalogue, written with semicolons and read with --delimiter, renders
    every item into the configured ledger, the images land on disk, and nothing keeps
    running."""
    semicolons = tmp_path / "semicolons.csv"
    with (EXAMPLES / "catalogue.csv").open(newline="") as source:
        rows = list(csv.reader(source))
    with semicolons.open("w", newline="") as sink:
        csv.writer(sink, delimiter=";").writerows(rows)
    before = _processes(tmp_path)
    result = demo(
        tmp_path, str(semicolons), "--use-configured", "--delimiter", "semicolon",
        configured={"SKUFLEET_DATABASE_URL": postgres_url},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "--use-configured: the configured ledger at postgresql" in result.stderr
    assert "started Redis" in result.stderr and "started SeaweedFS" in result.stderr
    assert "Flower at http://127.0.0.1:" in result.stderr
    images = list((tmp_path / "demo" / "images").rglob("*.png"))
    assert len(images) == 40
    assert "│ succeeded     │ 40" in result.stdout
    engine = sa.create_engine(postgres_url)
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM items")).scalar() == 40
    engine.dispose()
    time.sleep(1)
    assert _processes(tmp_path) - before == set()


def _processes(within: Path) -> set[str]:
    """Command lines of running demo-type processes (servers, Flower, workers) whose working
    directory is inside ``within``: this test's own, whatever else runs on the machine."""
    out = subprocess.run(["ps", "-ww", "-eo", "pid,args"], capture_output=True, text=True).stdout
    keep = ("redis-server", "weed server", "flower", "skufleet-worker", "skufleet.worker.process")
    found = set()
    for line in out.splitlines():
        pid, _, args = line.strip().partition(" ")
        if not any(k in args for k in keep) or "tests.fixtures" in args:
            continue
        try:
            cwd = Path(os.readlink(f"/proc/{pid}/cwd"))
        except OSError:
            continue  # gone meanwhile, or not ours to read
        if cwd == within or within in cwd.parents:
            found.add(line)
    return found


def test_a_kept_demo_stays_up_until_stopped(tmp_path: Path) -> None:
    """With services configured (here unreachable ones, a ledger and a Redis with
    passwords, and AWS keys) the demo uses none of them. --keep leaves Redis, S3, Flower
    (its state in the demo's folder) and a listening worker running; stack.json and
    skufleet.env (both mode 0600) hold none of the configured secrets, no secret is printed,
    and sourcing skufleet.env points skufleet and boto3 at the kept stack. --stop stops
    every process and removes both files."""
    catalogue = tmp_path / "two.csv"
    catalogue.write_text("sku,title,category\nK1,Red mug,Kitchen\nK2,Oak shelf,Home\n")
    configured = {
        "SKUFLEET_DATABASE_URL": "postgresql://skufleet:Ledger-Pass-Marker@127.0.0.1:1/prod",
        "SKUFLEET_REDIS_URL": "redis://:Redis-Pass-Marker@127.0.0.1:1/0",
        "AWS_ACCESS_KEY_ID": "Access-Key-Marker",
        "AWS_SECRET_ACCESS_KEY": "Secret-Key-Marker",
    }
    before = _processes(tmp_path)
    result = demo(tmp_path, str(catalogue), "--keep", configured=configured)
    assert result.returncode == 0, result.stderr[-3000:]
    printed = result.stdout + result.stderr
    assert "│ succeeded     │ 4" in result.stdout
    assert "skufleet demo --stop" in printed
    assert "private services only: SKUFLEET_REDIS_URL, SKUFLEET_DATABASE_URL" in result.stderr
    state, env_file = tmp_path / "demo" / "stack.json", tmp_path / "demo" / "skufleet.env"
    try:
        assert f"source {env_file}" in result.stdout.splitlines()
        for kept_file in (state, env_file):
            assert stat.S_IMODE(kept_file.stat().st_mode) == 0o600, kept_file
            for marker in ("Ledger-Pass-Marker", "Redis-Pass-Marker", "Access-Key-Marker",
                           "Secret-Key-Marker"):  # fmt: skip
                assert marker not in kept_file.read_text(), (kept_file, marker)
        exports = dict(
            line.removeprefix("export ").split("=", 1)
            for line in env_file.read_text().splitlines()
            if line.startswith("export ")
        )
        secret = shlex.split(exports["AWS_SECRET_ACCESS_KEY"])[0]
        password = shlex.split(exports["SKUFLEET_FLOWER_BASIC_AUTH"])[0].split(":", 1)[1]
        assert secret not in printed and password not in printed
        # a shell that still has the configured variables uses the kept stack once sourced
        used = subprocess.run(
            ["bash", "-c", f"source {shlex.quote(str(env_file))} && {BIN / 'skufleet'} runs "
             f"--json && {sys.executable} -c {shlex.quote(LIST_BUCKET)}"],
            env={**os.environ, **configured}, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert used.returncode == 0, used.stderr[-2000:]
        runs, objects = used.stdout.strip().splitlines()
        assert json.loads(runs)["counts"]["succeeded"] == 4
        assert int(objects) == 4
        kept = json.loads(state.read_text())
        running = _processes(tmp_path) - before
        for name in ("redis-server", "weed server", "flower", "skufleet-worker"):
            assert any(name in line for line in running), (name, running)
        assert listening(kept["flower"])
        assert list((tmp_path / "demo" / "flower").glob("flower.db*"))  # not in the cache
        assert not list((tmp_path / "cache").glob("flower.db*"))
    finally:
        stopped = demo(tmp_path, "--stop")
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    assert f"stopped {len(kept['processes'])} processes" in stopped.stdout
    assert not state.exists() and not env_file.exists()
    # each kept process led its own group: none of those groups has a live member left
    # (checked by group: other test sessions on this machine may start servers meanwhile)
    groups = {entry["pid"] for entry in kept["processes"]}
    wait_until(lambda: not _live_groups(groups), 10, "the kept processes to exit")


LIST_BUCKET = (
    "import os, boto3; "
    "listed = boto3.client('s3').list_objects_v2(Bucket=os.environ['SKUFLEET_S3_BUCKET']); "
    "print(sum(o['Key'].endswith('.png') for o in listed['Contents']))"
)
"""What an S3 client sees with only the AWS_* variables skufleet.env exports."""


def _live_groups(groups: set[int]) -> set[int]:
    """Those of process ``groups`` with a member that is running (not a zombie)."""
    live = set()
    for stat_file in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat_file.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # exited meanwhile
        if fields[0] != "Z" and int(fields[2]) in groups:
            live.add(int(fields[2]))
    return live
