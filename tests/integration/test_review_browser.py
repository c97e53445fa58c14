"""Human review in a real browser, against a real fleet.

PostgreSQL, Redis and SeaweedFS; a real ``skufleet-worker`` process drawing with the tiny
model, its run's quality gate set so that every image fails a check (``blank`` held to 0.99,
no re-rolls) and ends ``needs_review``; ``skufleet review`` as its own process; headless
Chromium driven by Selenium. A reviewer approves one image with the keyboard and rejects
another with its button, and ``skufleet reroll`` rejects a third by SKU and shot: the ledger
records each with the reviewer's name, the approved item succeeds, and the worker draws the
rejected ones again with new seeds.

Chromium and chromedriver come from the system (``.ci/run`` installs them). Where they are
missing the test is skipped, except in CI (``CI=true``), where that is a failure.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from skufleet.producer.services import free_port, wait_until
from skufleet.schemas.tables import Item, ItemStatus, Review, Run
from tests.fleet import BIN, Fleet, postgres_only

pytestmark = pytest.mark.integration

RUN = "review-run"
CHROMIUM = Path(os.environ.get("SKUFLEET_TEST_CHROMIUM", "/usr/bin/chromium"))
CHROMEDRIVER = Path(os.environ.get("SKUFLEET_TEST_CHROMEDRIVER", "/usr/bin/chromedriver"))
MARKUP = "<script>window.__pwned = 1</script><img src=x onerror='window.__pwned = 2'>"
CATALOGUE = (
    "sku,title,category\n"
    "SHOE-1,Trail shoe,Footwear\n"
    f'BAG-1,"Tote {MARKUP}",Bags\n'
    "BAG-2,Rolltop backpack,Bags\n"
)
"""3 SKUs × the e-commerce pack's 2 shots (front, lifestyle): 6 items in 2 categories."""
QUALITY = {
    "checks": ["dark", "blank"],
    "thresholds": {"dark": 0.0, "blank": 0.99},  # dark always passes, blank always fails
    "max_rolls": 0,
    "candidates": 1,
}
REVIEWER = "tester@ci"
SERVE = """
from skufleet.producer import cli, cli_review
known = {command.callback for command in cli.app.registered_commands}
for command in (cli_review.review, cli_review.reroll):
    if command not in known:  # until producer/cli.py registers them
        cli.app.command()(command)
cli.main()
"""
"""``skufleet`` with the review commands, whether producer/cli.py registers them yet or not."""


def require_browser() -> None:
    """Skip where Selenium, Chromium or chromedriver is missing; fail in CI."""
    problem = None
    try:
        import selenium  # noqa: F401
    except ImportError as exc:
        problem = f"selenium is not installed ({exc})"
    else:
        missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
        if missing:
            problem = f"{' and '.join(missing)} missing: apt-get install chromium chromium-driver"
    if problem is None:
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"the browser test needs a browser in CI: {problem}")
    pytest.skip(problem)


@contextlib.contextmanager
def chromium() -> Iterator[Any]:
    """Headless Chromium through Selenium, the system's chromedriver (nothing downloaded)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1400,1000",
    ):
        options.add_argument(argument)
    driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
    try:
        yield driver
    finally:
        driver.quit()


def items(fleet: Fleet) -> dict[tuple[str, str], Item]:
    with Session(fleet.engine()) as session:
        found = session.scalars(sa.select(Item).join(Run).where(Run.name == RUN)).all()
        session.expunge_all()
    return {(item.sku, item.shot): item for item in found}


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return bool(response.status == 200)
    except (OSError, urllib.error.HTTPError):
        return False


@postgres_only
def test_a_reviewer_approves_and_rejects_in_the_browser(fleet: Fleet) -> None:
    require_browser()
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    # 1. a run of 6 items whose gate fails every image, drawn by a real worker
    catalogue = fleet.tmp_path / "catalogue.csv"
    catalogue.write_text(CATALOGUE)
    assert fleet.cli("db", "upgrade").returncode == 0
    summary = fleet.cli_json(
        "enqueue", str(catalogue), "--run", RUN, "--model", "tiny", "--size", "64x48",
        "--batch-size", "6", "--json",
    )  # fmt: skip
    assert summary["enqueued"] == 6
    engine = fleet.engine()
    with engine.begin() as conn:  # the quality settings, before any worker claims an item
        params = conn.execute(sa.select(Run.params).where(Run.name == RUN)).scalar_one()
        conn.execute(
            sa.update(Run).where(Run.name == RUN).values(params={**params, "quality": QUALITY})
        )
    engine.dispose()

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    worker = (str(BIN / "skufleet-worker"), "--model", "tiny", "--devices", "cpu")
    server = (sys.executable, "-c", SERVE, "review", RUN, "--port", str(port))
    with fleet.background(*worker):
        done = {ItemStatus.SUCCEEDED, ItemStatus.NEEDS_REVIEW, ItemStatus.FAILED}
        wait_until(
            lambda: {i.status for i in items(fleet).values()} <= done, 240, "the worker's renders"
        )
        first = items(fleet)
        assert len(first) == 6 and all(i.status is not ItemStatus.FAILED for i in first.values())

        # 2. the review page in a browser
        with (
            fleet.background(*server, "--reviewer", REVIEWER),
            chromium() as driver,
        ):
            wait_until(lambda: answers(base + "/api/items"), 60, "skufleet review")
            driver.get(base + "/")
            wait = WebDriverWait(driver, 30)
            wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-loaded"))
            cards = driver.find_elements(By.CSS_SELECTOR, "article.card")
            shown = [(c.get_attribute("data-sku"), c.get_attribute("data-shot")) for c in cards]
            # grouped by category, then SKU
            assert shown == [
                ("BAG-1", "front"),
                ("BAG-1", "lifestyle"),
                ("BAG-2", "front"),
                ("BAG-2", "lifestyle"),
                ("SHOE-1", "front"),
                ("SHOE-1", "lifestyle"),
            ]
            headings = driver.find_elements(By.CSS_SELECTOR, "section.category > h2")
            assert [h.text for h in headings] == ["Bags", "Footwear"]
            # every thumbnail came from the bucket through the server
            wait.until(
                lambda d: (
                    d.execute_script(
                        "return Array.from(document.images)"
                        ".filter(i => i.complete && i.naturalWidth > 0).length"
                    )
                    == 6
                )
            )
            # catalogue markup is text on the page, and never ran
            group = driver.find_element(By.CSS_SELECTOR, '.sku-group[data-sku="BAG-1"] h3')
            assert MARKUP in group.text
            assert driver.execute_script("return window.__pwned") is None

            # 3. j/k move the selection; a approves the selected card
            approved, rejected = cards[0], cards[3]
            approved.find_element(By.CSS_SELECTOR, ".sku").click()
            keys = ActionChains(driver)
            keys.send_keys("j").perform()
            assert "selected" in cards[1].get_attribute("class")
            keys.send_keys("k").perform()
            assert "selected" in approved.get_attribute("class")
            keys.send_keys("a").perform()
            wait.until(lambda d: approved.get_attribute("data-decision") == "approved")
            assert approved.get_attribute("data-status") == "succeeded"
            assert (
                f"approved by {REVIEWER}" in approved.find_element(By.CLASS_NAME, "decision").text
            )
            assert "selected" in cards[1].get_attribute("class")  # the next card, for the next

            # 4. the reject button of another card
            rejected.find_element(By.CSS_SELECTOR, "button.reject").click()
            wait.until(lambda d: rejected.get_attribute("data-decision") == "rejected")
            assert rejected.get_attribute("data-status") in {"pending", "queued", "running"}
            assert rejected.find_element(By.CSS_SELECTOR, "button.reject").get_attribute("disabled")
            flash = driver.find_elements(By.CSS_SELECTOR, ".card .message")
            assert not [m.text for m in flash if m.text.startswith("not recorded")]
            failed_rows = driver.find_elements(By.CSS_SELECTOR, 'tr.failed[data-check="blank"]')

        # 5. the ledger: both decisions with the reviewer's name
        approved_key = ("BAG-1", "front")
        rejected_key = ("BAG-2", "lifestyle")
        with Session(fleet.engine()) as session:
            decided = {
                (r.item_id, r.decision, r.reviewer)
                for r in session.scalars(sa.select(Review)).all()
            }
        assert decided == {
            (first[approved_key].id, "approved", REVIEWER),
            (first[rejected_key].id, "rejected", REVIEWER),
        }
        assert items(fleet)[approved_key].status is ItemStatus.SUCCEEDED

        # 6. `skufleet reroll` rejects by SKU and shot from the command line
        rerolled_key = ("SHOE-1", "front")
        result = fleet.run(
            sys.executable, "-c", SERVE, "reroll", RUN, "--sku", "SHOE-1", "--shot", "front",
            "--reviewer", "cli@ci", "--json",
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["decided"] == 1

        # 7. the worker draws both rejected items again, each with a new seed
        def drawn_again() -> bool:
            now = items(fleet)
            return all(
                now[key].status in done and (now[key].renders or 0) > (first[key].renders or 0)
                for key in (rejected_key, rerolled_key)
            )

        wait_until(drawn_again, 180, "the worker to draw the rejected items again")
    final = items(fleet)
    with Session(fleet.engine()) as session:
        by_cli = session.scalars(sa.select(Review).where(Review.reviewer == "cli@ci")).all()
    assert [(r.item_id, r.decision) for r in by_cli] == [(first[rerolled_key].id, "rejected")]
    untouched = {
        k: v.status for k, v in final.items() if k not in (approved_key, rejected_key, rerolled_key)
    }

    # the quality gate, as the worker applies it (worker/render.py): every image failed
    # blank and waits for review, scored on the page; the rejected one drawn with its next
    # seed variant
    assert {i.status for i in first.values()} == {ItemStatus.NEEDS_REVIEW}, {
        k: (str(i.status), i.verdict, i.quality) for k, i in first.items()
    }
    assert {i.verdict for i in first.values()} == {"failed"}
    assert all(json.loads(i.quality)["blank"]["passed"] is False for i in first.values())
    assert len(failed_rows) == 6
    assert set(untouched.values()) == {ItemStatus.NEEDS_REVIEW}
    for key in (rejected_key, rerolled_key):
        before, after = first[key], final[key]
        assert after.status is ItemStatus.NEEDS_REVIEW, key  # blank fails again
        assert (after.roll or 0) > (before.roll or 0), (key, before.roll, after.roll)
        assert after.image_seed != before.image_seed, (key, before.image_seed, after.image_seed)
        assert after.sha256 != before.sha256, key
