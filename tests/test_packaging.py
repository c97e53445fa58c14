"""The wheel holds one package, ``skufleet``, with everything it reads at run time."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_wheel_installs_only_skufleet_with_its_data(tmp_path: Path) -> None:
    """`pip install .` puts a single top-level package into site-packages (plus its
    metadata), and inside it the packs, CLIP's vocabulary and the migrations."""
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path), str(ROOT)],
        check=True,
        capture_output=True,
        cwd=tmp_path,
    )  # fmt: skip
    (wheel,) = tmp_path.glob("skufleet-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {name.split("/")[0] for name in names if ".dist-info/" not in name} == {"skufleet"}
    for needed in (
        "skufleet/schemas/ledger/__init__.py",
        "skufleet/producer/cli.py",
        "skufleet/worker/process.py",
        "skufleet/producer/packs/ecommerce.toml",
        "skufleet/schemas/clip_bpe_simple_vocab_16e6.txt.gz",
        "skufleet/migrations/versions/0005_object_keys_and_events.py",
        "skufleet/migrations/script.py.mako",
    ):
        assert needed in names, needed
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    scripts = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "skufleet = skufleet.producer.cli:main" in scripts
    assert "skufleet-worker = skufleet.worker.launcher:main" in scripts
