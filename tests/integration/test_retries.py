"""Errors are recorded on the item and retried with backoff up to the cap, then failed."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from skufleet.schemas.tables import Item, ItemStatus
from tests.fixtures import stand_in_worker
from tests.fixtures.pipelines import POISON
from tests.fleet import Fleet, postgres_only

pytestmark = pytest.mark.integration

ONE_SHOT_PACK = """
name = "one-shot"
[categories.default]
[categories.default.shots.main]
prompt = "{{ title }}"
"""


@postgres_only
def test_a_poison_item_fails_after_the_cap_and_the_rest_of_its_batch_succeeds(
    fleet: Fleet,
) -> None:
    """A batch that fails as a whole is retried item by item; only the poison item fails."""
    catalogue = fleet.tmp_path / "catalogue.csv"
    rows = [f"SKU-{i},Item {i}" for i in range(6)]
    rows[2] = f"SKU-2,{POISON} item"
    catalogue.write_text("sku,title\n" + "\n".join(rows) + "\n")
    pack = fleet.tmp_path / "one-shot.toml"
    pack.write_text(ONE_SHOT_PACK)
    fleet.env["SKUFLEET_MAX_ATTEMPTS"] = "3"
    assert fleet.cli("db", "upgrade").returncode == 0
    fleet.cli_json(
        "enqueue",
        str(catalogue),
        "--run",
        "poison",
        "--model",
        "tiny",
        "--template",
        str(pack),
        "--batch-size",
        "3",
        "--json",
    )

    result = fleet.run(*stand_in_worker("--fixture", "poison"))
    assert result.returncode == 0, result.stderr[-4000:]

    with Session(fleet.engine()) as session:
        items = {item.sku: item for item in session.scalars(sa.select(Item))}
    poison = items.pop("SKU-2")
    assert poison.status is ItemStatus.FAILED
    assert poison.attempts == 3
    assert poison.last_error is not None and "poisoned prompt" in poison.last_error
    assert poison.sha256 is None and poison.object_key not in fleet.objects("poison/")
    assert all(item.status is ItemStatus.SUCCEEDED for item in items.values())
    # the poison's batch mates failed once with it, then succeeded alone
    assert sorted(item.attempts for item in items.values()) == [1, 1, 1, 2, 2]
    assert sorted(fleet.objects("poison/")) == sorted(i.object_key for i in items.values())

    # an explicit retry of the failed item gives it a fresh budget of attempts
    retried = fleet.cli_json("retry", "poison", "--failed", "--json")
    assert (retried["retried"], retried["enqueued"]) == (1, 1)
    result = fleet.run(*stand_in_worker("--fixture", "poison"))
    assert result.returncode == 0, result.stderr[-4000:]
    with Session(fleet.engine()) as session:
        again = session.scalars(sa.select(Item).where(Item.sku == "SKU-2")).one()
    assert (again.status, again.attempts) == (ItemStatus.FAILED, 6)
    reasons = fleet.cli("status", "poison")
    assert "failures by kind" in reasons.stdout and "poisoned prompt" in reasons.stdout
