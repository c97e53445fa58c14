"""Human review without a browser: the review server's HTTP API and its rules (the token on
every POST, loopback only without credentials, basic auth with them), thumbnails, the static
export, and ``skufleet reroll``'s input file.

A real SQLite ledger, its items rendered through the ledger's own claim and finish (with the
quality gate's record); the bucket and the broker are stand-ins that keep what they get.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import re
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
import typer
from botocore.exceptions import ClientError
from PIL import Image
from pydantic import SecretStr
from typer.testing import CliRunner, Result

from skufleet.producer import cli, cli_review, review, review_server, review_sheet
from skufleet.producer.db import upgrade
from skufleet.schemas import ledger
from skufleet.schemas.errors import ConfigError
from skufleet.schemas.names import render_queue
from skufleet.schemas.params import RenderPayload
from skufleet.schemas.settings import Settings
from skufleet.schemas.tables import Item, ItemStatus, Review

RUN = "spring"
XSS_SKU = "<script>alert(1)</script>"
XSS_TITLE = "</script><img src=x onerror=alert(2)> & <!-- Mug"
PASSWORD = "correct-horse-battery"
FAILED = {
    "blank": {"score": 0.01, "threshold": 0.02, "passed": False},
    "dark": {"score": 0.9, "threshold": 0.06, "passed": True},
}
NEAR = {  # passed, within 10% of its threshold: "low score"
    "blank": {"score": 0.021, "threshold": 0.02, "passed": True},
    "dark": {"score": 0.9, "threshold": 0.06, "passed": True},
}
CLEAN = {
    "blank": {"score": 0.3, "threshold": 0.02, "passed": True},
    "dark": {"score": 0.9, "threshold": 0.06, "passed": True},
}


# --- stand-ins --------------------------------------------------------------------------


class FakeBucket:
    """What the review reads of :class:`Bucket`: ``name`` and ``client.get_object``."""

    def __init__(self) -> None:
        self.name = "test-bucket"
        self.objects: dict[str, bytes] = {}
        self.client = self

    def get_object(self, Bucket: str, Key: str) -> dict[str, Any]:  # boto3's names
        if Key not in self.objects:
            raise ClientError({"Error": {"Code": "NoSuchKey", "Message": "gone"}}, "GetObject")
        return {"Body": io.BytesIO(self.objects[Key])}


@dataclass
class FakePublisher:
    published: list[tuple[str, list[RenderPayload]]] = field(default_factory=list)

    def publish(self, queue: str, payloads: Any, labels: Any = ()) -> None:
        self.published.append((queue, list(payloads)))

    def close(self) -> None:
        pass

    def __enter__(self) -> FakePublisher:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def png(width: int = 512, height: int = 384) -> bytes:
    image = Image.new("RGB", (width, height), (200, 40, 40))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


# --- a ledger with a rendered run -------------------------------------------------------


@dataclass(frozen=True)
class Shot:
    sku: str
    shot: str
    title: str
    category: str
    scores: dict[str, Any] | None  # None: no gate (succeeded, no scores)
    rerolled: bool = False


SHOTS = (
    Shot("BAG-1", "front", "Canvas tote", "Bags", FAILED, rerolled=True),
    Shot("BAG-1", "lifestyle", "Canvas tote", "Bags", CLEAN),
    Shot("SHOE-1", "front", "Trail shoe", "Footwear", NEAR),
    Shot(XSS_SKU, "front", XSS_TITLE, "Mugs", FAILED),
    Shot("PLAIN-1", "front", "Plain", "Mugs", None),
)


@pytest.fixture
def lite(tmp_path: Path) -> Iterator[sa.Engine]:
    """An upgraded SQLite ledger of this test's own."""
    engine = ledger.create_engine(f"sqlite:///{tmp_path / 'ledger.db'}")
    upgrade(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def bucket() -> FakeBucket:
    return FakeBucket()


@pytest.fixture
def items(lite: sa.Engine, bucket: FakeBucket) -> dict[tuple[str, str], int]:
    """Run ``spring`` with :data:`SHOTS` rendered and stored: (sku, shot) → item id."""
    return render(lite, bucket, SHOTS)


def render(engine: sa.Engine, bucket: FakeBucket, shots: tuple[Shot, ...]) -> dict[Any, int]:
    rows = [
        {
            "sku": s.sku,
            "shot": s.shot,
            "prompt": f"a photo of {s.title}",
            "negative_prompt": "",
            "output": "{}",
            "seed": 1000 + n,
            "fields": ledger.catalogue_fields(s.title, s.category, {}),
            "width": 64,
            "height": 64,
            "steps": 2,
            "guidance_scale": 7.5,
            "scheduler": "default",
        }
        for n, s in enumerate(shots)
    ]
    with ledger.begin(engine) as conn:
        run_id = ledger.upsert_run(conn, RUN, "tiny", 1, "ecommerce", {"batch_size": 4})
        staging = ledger.ItemStaging(conn, run_id)
        staging.add(rows)
        staging.merge()
    ids = [i for chunk in ledger.queue_pending(engine, run_id, 100) for b in chunk for i in b]
    claimed = ledger.claim(engine, run_id, "tiny", ids, "w1", "cpu", 60).claims
    by_pair = {(s.sku, s.shot): s for s in shots}
    found: dict[Any, int] = {}
    for claim in claimed:
        shot = by_pair[(claim.sku, claim.shot)]
        gated = None
        if shot.scores is not None:
            passed = all(v["passed"] for v in shot.scores.values())
            drawn = [ledger.Drawn(0, claim.seed, shot.scores, passed, False)]
            if shot.rerolled:
                drawn.append(ledger.Drawn(1, 77, shot.scores, passed, True))
            gated = ledger.Gated(tuple(drawn), len(drawn) - 1, 12345)
        body = png()
        assert claim.object_key is not None
        bucket.objects[claim.object_key] = body
        assert ledger.finish(
            engine, claim, len(body), "ab" * 32, 0.1, width=512, height=384,
            image_format="png", gated=gated,
        )  # fmt: skip
        found[(claim.sku, claim.shot)] = claim.id
    return found


def item_row(engine: sa.Engine, item_id: int) -> Any:
    with engine.connect() as conn:
        return conn.execute(sa.select(Item).where(Item.id == item_id)).one()


def reviews(engine: sa.Engine) -> list[Any]:
    with engine.connect() as conn:
        return list(conn.execute(sa.select(Review).order_by(Review.id)).all())


# --- the server, in this process --------------------------------------------------------


def make_app(
    engine: sa.Engine,
    bucket: FakeBucket,
    publisher: FakePublisher | None = None,
    credentials: tuple[str, ...] = (),
) -> review_server.ReviewApp:
    publisher = publisher or FakePublisher()
    return review_server.ReviewApp(
        engine,
        bucket,  # type: ignore[arg-type]
        RUN,
        publisher=lambda: publisher,  # type: ignore[arg-type,return-value]
        queue_prefix="test",
        reviewer_default="tester@host",
        credentials=credentials,
        loopback_only=not credentials,
    )


@contextlib.contextmanager
def running(app: review_server.ReviewApp) -> Iterator[str]:
    server = review_server.ReviewServer(app, ("127.0.0.1", 0))
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def call(
    url: str,
    method: str = "GET",
    *,
    headers: dict[str, str] | None = None,
    body: bytes | None = None,
    auth: tuple[str, str] | None = None,
) -> Answer:
    request = urllib.request.Request(url, method=method, data=body, headers=headers or {})
    if auth is not None:
        token = base64.b64encode(":".join(auth).encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return Answer(response.status, dict(response.headers), response.read())
    except urllib.error.HTTPError as exc:
        return Answer(exc.code, dict(exc.headers), exc.read())


def page_data(page: str) -> dict[str, Any]:
    """The JSON the page embeds in its ``<script type="application/json">``."""
    match = re.search(r'<script type="application/json" id="skufleet-data">(.*?)</script>', page)
    assert match is not None
    return dict(json.loads(match.group(1)))


def token_of(base: str, auth: tuple[str, str] | None = None) -> str:
    answer = call(base + "/", auth=auth)
    assert answer.status == 200, answer
    return str(page_data(answer.body.decode())["token"])


def decide(base: str, item_id: int, action: str, token: str | None, **kwargs: Any) -> Answer:
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers[review_server.TOKEN_HEADER] = token
    return call(
        f"{base}/api/items/{item_id}/{action}", "POST", headers=headers, body=b"{}", **kwargs
    )


# --- decisions through the API ------------------------------------------------------------


def test_decisions_through_the_api_change_the_ledger(
    lite: sa.Engine, bucket: FakeBucket, items: dict[tuple[str, str], int]
) -> None:
    """The page lists the run's stored images with their scores; approving a needs-review
    item makes it succeeded with a review row naming the reviewer; rejecting one puts it
    back on the queue (published) with its review row; an item without a stored image to
    decide on answers 409 and records nothing."""
    publisher = FakePublisher()
    approved, rejected = items[("BAG-1", "front")], items[(XSS_SKU, "front")]
    with running(make_app(lite, bucket, publisher)) as base:
        page = call(base + "/")
        assert page.status == 200 and page.headers["Content-Type"].startswith("text/html")
        assert "script-src 'nonce-" in page.headers["Content-Security-Policy"]
        assert page.headers["X-Frame-Options"] == "DENY"
        token = str(page_data(page.body.decode())["token"])

        listed = call(base + "/api/items").json()["items"]
        # by category, then SKU and shot
        assert [(i["category"], i["sku"], i["shot"]) for i in listed] == [
            ("Bags", "BAG-1", "front"),
            ("Bags", "BAG-1", "lifestyle"),
            ("Footwear", "SHOE-1", "front"),
            ("Mugs", XSS_SKU, "front"),  # '<' sorts before letters
            ("Mugs", "PLAIN-1", "front"),
        ]
        by_id = {i["id"]: i for i in listed}
        assert by_id[approved]["status"] == "needs_review"
        assert by_id[approved]["failed"] == ["blank"] and by_id[approved]["rerolls"] == 1
        assert by_id[approved]["seed"] == 77 and by_id[approved]["roll"] == 1
        lows = {i["sku"] + "/" + i["shot"] for i in listed if i["low"]}
        assert lows == {"BAG-1/front", "SHOE-1/front", f"{XSS_SKU}/front"}

        answer = decide(base, approved, "approve", token)
        assert answer.status == 200, answer.body
        assert answer.json()["status"] == "succeeded"
        assert answer.json()["decision"] == "approved"
        assert answer.json()["reviewer"] == "tester@host"
        assert answer.json()["verdict"] == "approved"

        answer = decide(base, rejected, "reject", token)
        assert answer.status == 200, answer.body
        assert (answer.json()["status"], answer.json()["enqueued"]) == ("queued", 1)

        # rendering again: nothing to decide on until it is stored
        again = decide(base, rejected, "approve", token)
        assert again.status == 409 and "queued" in again.json()["error"]
        assert decide(base, 999_999, "approve", token).status == 409

    row = item_row(lite, approved)
    assert (row.status, row.verdict) == (ItemStatus.SUCCEEDED, "approved")
    row = item_row(lite, rejected)
    assert row.status is ItemStatus.QUEUED and row.next_roll == 1
    assert [(r.item_id, r.decision, r.reviewer, r.seed) for r in reviews(lite)] == [
        (approved, "approved", "tester@host", 77),
        (rejected, "rejected", "tester@host", 1003),
    ]
    [(queue, payloads)] = publisher.published
    assert queue == render_queue("test", "tiny")
    assert [p.item_ids for p in payloads] == [[rejected]]


def test_a_post_without_the_token_is_refused(
    lite: sa.Engine, bucket: FakeBucket, items: dict[tuple[str, str], int]
) -> None:
    """A POST without the page's token, or with another, is 403 and changes nothing: another
    site cannot make the reviewer's browser decide."""
    item = items[("BAG-1", "front")]
    with running(make_app(lite, bucket)) as base:
        token_of(base)
        for token in (None, "", "not-the-token"):
            answer = decide(base, item, "approve", token)
            assert answer.status == 403, (token, answer)
            assert review_server.TOKEN_HEADER in answer.json()["error"]
        # a GET never decides
        assert call(f"{base}/api/items/{item}/approve").status == 404
    assert item_row(lite, item).status is ItemStatus.NEEDS_REVIEW
    assert reviews(lite) == []


def test_without_credentials_it_listens_on_the_loopback_address_only(
    lite: sa.Engine, bucket: FakeBucket, items: dict[tuple[str, str], int], tmp_path: Path
) -> None:
    """No SKUFLEET_FLOWER_BASIC_AUTH: any address but the loopback one is refused before
    anything else happens, and the server answers only requests for a loopback name (a
    rebound DNS name of another site is refused)."""
    settings = Settings(
        database_url=f"sqlite:///{tmp_path / 'absent' / 'x.db'}", flower_basic_auth=None
    )
    for address in ("0.0.0.0", "", "::", "192.168.1.20", "review.example.com"):
        with pytest.raises(ConfigError, match="without authentication"):
            review.serve(settings, RUN, address=address, port=1, reviewer_default="x")
    assert review.check_listen(settings, "127.0.0.1") == []
    assert review.check_listen(settings, "::1") == []
    with running(make_app(lite, bucket)) as base:
        assert call(base + "/api/items").status == 200
        port = base.rsplit(":", 1)[1]
        assert call(base + "/", headers={"Host": f"localhost:{port}"}).status == 200
        rebound = call(base + "/api/items", headers={"Host": f"evil.example:{port}"})
        assert rebound.status == 421 and b"BAG-1" not in rebound.body


def test_with_credentials_every_page_and_call_needs_them(
    lite: sa.Engine, bucket: FakeBucket, items: dict[tuple[str, str], int]
) -> None:
    """With credentials, every path answers 401 and a Basic challenge without them or with
    wrong ones (whatever the method), and the decision is recorded under the login's user."""
    settings = Settings(flower_basic_auth=SecretStr(f"ops:{PASSWORD}"))
    credentials = review.check_listen(settings, "0.0.0.0")
    assert credentials == [f"ops:{PASSWORD}"]
    with pytest.raises(ConfigError, match="password"):
        review.check_listen(Settings(flower_basic_auth=SecretStr("ops:short")), "127.0.0.1")

    item = items[("BAG-1", "front")]
    app = make_app(lite, bucket, credentials=tuple(credentials))
    with running(app) as base:
        paths = ("/", "/api/items", f"/image/{item}", "/nope", f"/api/items/{item}/approve")
        for path in paths:
            for auth in (None, ("ops", "wrong-password-here"), ("nobody", PASSWORD)):
                for method in ("GET", "POST"):
                    body = b"" if method == "POST" else None
                    answer = call(base + path, method, auth=auth, body=body)
                    assert answer.status == 401, (path, auth, method)
                    assert answer.headers["WWW-Authenticate"].startswith("Basic realm=")
                    assert b"BAG-1" not in answer.body
        auth = ("ops", PASSWORD)
        assert call(base + "/api/items", auth=auth).status == 200
        token = token_of(base, auth)
        assert decide(base, item, "approve", None, auth=auth).status == 403
        answer = decide(base, item, "approve", token, auth=auth)
        assert answer.status == 200 and answer.json()["reviewer"] == "ops"
    assert [(r.decision, r.reviewer) for r in reviews(lite)] == [("approved", "ops")]


def test_images_are_thumbnails_of_the_stored_object(
    lite: sa.Engine, bucket: FakeBucket, items: dict[tuple[str, str], int]
) -> None:
    """/image/<id>: the stored image shrunk to 256 pixels, as JPEG, with its hash as ETag
    (a repeat is 304); 404 for an item of no run, of another id, or whose object is gone."""
    item = items[("BAG-1", "front")]
    with running(make_app(lite, bucket)) as base:
        answer = call(f"{base}/image/{item}")
        assert answer.status == 200 and answer.headers["Content-Type"] == "image/jpeg"
        with Image.open(io.BytesIO(answer.body)) as image:
            assert (image.format, image.size) == ("JPEG", (256, 192))
        etag = answer.headers["ETag"]
        assert call(f"{base}/image/{item}", headers={"If-None-Match": etag}).status == 304
        for path in ("/image/999999", "/image/abc", "/image/", "/image/1/2"):
            assert call(base + path).status == 404, path
        gone = items[("SHOE-1", "front")]
        key = item_row(lite, gone).object_key
        del bucket.objects[key]
        assert call(f"{base}/image/{gone}").status == 404


# --- the export -----------------------------------------------------------------------------


def test_the_export_is_one_static_file_with_every_text_escaped(
    lite: sa.Engine, bucket: FakeBucket, items: dict[tuple[str, str], int], tmp_path: Path
) -> None:
    """sheet.html: one file, thumbnails embedded as data: URIs, no external resource, no
    token or approve/reject call; catalogue text with markup never appears raw, and reads
    back exactly from the embedded JSON."""
    out = tmp_path / "out"
    out.mkdir()
    del bucket.objects[item_row(lite, items[("PLAIN-1", "front")]).object_key]
    result = review.export(lite, bucket, RUN, out)  # type: ignore[arg-type]
    assert (result["items"], result["missing"]) == (5, 1)
    assert [p.name for p in out.iterdir()] == ["sheet.html"]
    page = (out / "sheet.html").read_text(encoding="utf-8")

    # nothing of the catalogue is markup on the page
    assert XSS_SKU not in page and "alert(1)</script>" not in page
    assert "<img src=x" not in page and "<!-- Mug" not in page
    assert page.count("</script>") == 2  # the data's element and the page's script
    assert "innerHTML" not in page and "outerHTML" not in page
    # self-contained and read-only
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//)""", page)
    assert "Content-Security-Policy" in page
    data = page_data(page)
    assert data["mode"] == "export" and "token" not in data
    by_sku = {(i["sku"], i["shot"]): i for i in data["items"]}
    assert by_sku[(XSS_SKU, "front")]["title"] == XSS_TITLE
    assert by_sku[("BAG-1", "front")]["thumb"].startswith("data:image/jpeg;base64,")
    assert by_sku[("PLAIN-1", "front")]["thumb"] is None
    assert by_sku[("BAG-1", "front")]["scores"]["blank"]["passed"] is False
    thumb = base64.b64decode(by_sku[("BAG-1", "front")]["thumb"].split(",", 1)[1])
    with Image.open(io.BytesIO(thumb)) as image:
        assert max(image.size) == 256

    # a file name works too, and an existing file is replaced whole
    again = review.export(lite, bucket, RUN, tmp_path / "sheet-2.html")  # type: ignore[arg-type]
    assert Path(again["path"]).read_text(encoding="utf-8").count("data:image/jpeg") == 4
    with pytest.raises(ConfigError, match="--export"):
        review.export(lite, bucket, RUN, tmp_path / "missing" / "s.html")  # type: ignore[arg-type]


def test_embedded_json_cannot_end_its_script_element() -> None:
    """``</script>``, ``<!--`` and line separators in a value stay inside the JSON."""
    text = review_sheet.embed_json({"sku": "</script><!--\u2028&"})
    assert "<" not in text and ">" not in text and "&" not in text and "\u2028" not in text
    assert json.loads(text) == {"sku": "</script><!--\u2028&"}


# --- the commands -------------------------------------------------------------------------


def review_app() -> typer.Typer:
    """The skufleet app with the review commands, registered as producer/cli.py does."""
    app = typer.Typer()
    app.callback()(cli._main)
    app.command()(cli_review.review)
    app.command()(cli_review.reroll)
    return app


def skufleet(env: dict[str, str], *args: str) -> Result:
    return CliRunner().invoke(review_app(), list(args), env=env)


@pytest.fixture
def env(
    lite: sa.Engine, items: dict[tuple[str, str], int], monkeypatch: pytest.MonkeyPatch
) -> Iterator[dict[str, str]]:
    """SKUFLEET_* for the run's ledger; the broker is a stand-in that keeps what it gets."""
    publisher = FakePublisher()
    monkeypatch.setattr("skufleet.producer.publish.Publisher", lambda settings: publisher)
    yield {"SKUFLEET_DATABASE_URL": str(lite.url), "SKUFLEET_QUEUE_PREFIX": "test"}


def one_error_line(result: Result, code: int = 2) -> str:
    assert result.exit_code == code, (result.exit_code, result.stderr, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


@pytest.mark.parametrize(
    ("content", "named"),
    [
        ("sku,shot\nBAG-1,front\nNOPE-9,front\n", "line 3: column 'sku' value 'NOPE-9'"),
        ("sku,shot\nBAG-1,back\n", "line 2: column 'sku' value 'BAG-1': the run has no item"),
        ("sku,shot\nBAG-1,front\n,front\n", "line 3: column 'sku' is empty"),
        ("sku,shot\nBAG-1,front,extra\n", "line 2: 3 fields, the header names 2"),
        ("SKU_ID,shot\nBAG-1,front\n", "no 'sku' column in its header line (found 'SKU_ID'"),
        ("sku\n", "no rows below its header line"),
    ],
    ids=["unknown sku", "unknown shot", "empty sku", "extra field", "no sku column", "no rows"],
)
def test_reroll_names_the_bad_row_of_its_file(
    env: dict[str, str], lite: sa.Engine, tmp_path: Path, content: str, named: str
) -> None:
    """A bad --file is one error line naming the file, the line, the column and the value,
    exit 2, and nothing is rejected (not even the good rows)."""
    rejects = tmp_path / "rejects.csv"
    rejects.write_text(content)
    line = one_error_line(skufleet(env, "reroll", RUN, "--file", str(rejects)))
    assert f"--file {rejects}" in line and named in line, line
    assert reviews(lite) == []


def test_reroll_usage_errors_exit_2(env: dict[str, str], tmp_path: Path) -> None:
    cases = {
        ("reroll", RUN): "--sku or --file",
        ("reroll", "nope", "--sku", "BAG-1"): "no run named 'nope'",
        ("reroll", RUN, "--sku", "NOPE"): "--sku 'NOPE': the run has no item for SKU 'NOPE'",
        ("reroll", RUN, "--file", str(tmp_path / "absent.csv")): "cannot read it",
        ("reroll", RUN, "--sku", "BAG-1", "--reviewer", " "): "--reviewer",
    }
    for args, named in cases.items():
        assert named in one_error_line(skufleet(env, *args)), args
    (tmp_path / "latin1.csv").write_bytes(b"sku\nCAF\xc9\n")
    assert "not UTF-8" in one_error_line(
        skufleet(env, "reroll", RUN, "--file", str(tmp_path / "latin1.csv"))
    )


def test_reroll_rejects_what_it_names_and_queues_it(
    env: dict[str, str], lite: sa.Engine, items: dict[tuple[str, str], int], tmp_path: Path
) -> None:
    """--sku (every shot, or --shot's) and --file rows (a BOM, semicolons, a row without a
    shot) are rejected under the reviewer's name and queued; naming them again while they
    render skips them and exits 1."""
    rejects = tmp_path / "rejects.csv"
    rejects.write_text("\ufeffsku;shot\nSHOE-1;\n")
    result = skufleet(
        env, "reroll", RUN, "--sku", "BAG-1", "--file", str(rejects), "--reviewer", "ann",
        "--json",
    )  # fmt: skip
    assert result.exit_code == 0, (result.stderr, result.exception)
    summary = json.loads(result.stdout)
    assert (summary["decided"], summary["requested"], summary["enqueued"]) == (3, 3, 3)
    assert summary["skipped"] == []
    wanted = {items[("BAG-1", "front")], items[("BAG-1", "lifestyle")], items[("SHOE-1", "front")]}
    assert {r.item_id for r in reviews(lite)} == wanted
    assert {(r.decision, r.reviewer) for r in reviews(lite)} == {("rejected", "ann")}
    assert {item_row(lite, i).status for i in wanted} == {ItemStatus.QUEUED}

    again = skufleet(env, "reroll", RUN, "--sku", "BAG-1", "--shot", "front")
    assert again.exit_code == 1, again.stderr
    assert "0 items rejected" in again.stdout and "it is queued" in again.stderr
    plain = skufleet(env, "reroll", RUN, "--sku", XSS_SKU)
    assert plain.exit_code == 0, plain.stderr
    assert "1 items rejected by " in plain.stdout and "@" in plain.stdout


def test_review_export_command_writes_the_sheet(
    env: dict[str, str], bucket: FakeBucket, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`skufleet review RUN --export PATH` writes the sheet and says where; an unknown run is
    one line, exit 2; a non-loopback address without credentials is refused, exit 2."""
    monkeypatch.setattr("skufleet.producer.bucket.Bucket", lambda settings: bucket)
    result = skufleet(env, "review", RUN, "--export", str(tmp_path))
    assert result.exit_code == 0, (result.stderr, result.exception)
    assert "5 images written to" in result.stdout and (tmp_path / "sheet.html").is_file()
    assert "no run named 'nope'" in one_error_line(
        skufleet(env, "review", "nope", "--export", str(tmp_path))
    )
    assert "without authentication" in one_error_line(
        skufleet(env, "review", RUN, "--address", "0.0.0.0")
    )
    assert "--port" in one_error_line(skufleet(env, "review", RUN, "--port", "0"))
