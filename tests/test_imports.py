"""The import contract: which part of skufleet may import which, checked on the source.

- ``schemas`` (the shared contracts) imports neither ``producer`` nor ``worker``, and no
  torch, boto3 or Celery;
- ``worker`` never imports ``producer``, and ``producer`` never imports ``worker``: what
  both need lives in ``schemas``, or is handed off by task name;
- everything is imported under its installed name, ``skufleet.…``.

Every import counts, those inside functions included.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PARTS = ("schemas", "producer", "worker", "migrations")
FORBIDDEN = {
    "schemas": ("skufleet.producer", "skufleet.worker", "torch", "boto3", "botocore", "celery"),
    "producer": ("skufleet.worker",),
    "worker": ("skufleet.producer",),
    "migrations": ("skufleet.producer", "skufleet.worker"),
}


def imports(source: str) -> list[tuple[int, str]]:
    """``(line, module)`` of every import in ``source``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.append((node.lineno, node.module))
    return sorted(found)


def violations(part: str, source: str) -> list[str]:
    """What ``source``, a module of ``part``, imports that the contract forbids."""
    broken = []
    for line, module in imports(source):
        if module.split(".")[0] in PARTS:
            broken.append(f"line {line}: {module} (import it as skufleet.{module})")
        elif any(module == bad or module.startswith(bad + ".") for bad in FORBIDDEN[part]):
            broken.append(f"line {line}: {module}")
    return broken


@pytest.mark.parametrize("part", PARTS)
def test_each_part_imports_only_what_the_contract_allows(part: str) -> None:
    """No module of the part imports a part or library its rules forbid."""
    broken = {
        str(path.relative_to(ROOT)): found
        for path in sorted((ROOT / part).rglob("*.py"))
        if (found := violations(part, path.read_text(encoding="utf-8")))
    }
    assert broken == {}


def test_the_contract_catches_a_worker_importing_the_producer() -> None:
    """The check itself works: an import of the producer in the worker, even inside a
    function, and an import by the folder's own name are both reported."""
    source = "def f():\n    from skufleet.producer import reconcile\nimport worker.render\n"
    assert violations("worker", source) == [
        "line 2: skufleet.producer",
        "line 3: worker.render (import it as skufleet.worker.render)",
    ]
    assert violations("producer", "import skufleet.worker.tasks\n") == [
        "line 1: skufleet.worker.tasks"
    ]
    assert violations("schemas", "import torch\n") == ["line 1: torch"]


def test_no_module_is_longer_than_450_lines() -> None:
    """Modules stay small enough to read in one sitting."""
    long = {
        str(path.relative_to(ROOT)): lines
        for part in ("schemas", "producer", "worker")
        for path in sorted((ROOT / part).rglob("*.py"))
        if (lines := len(path.read_text(encoding="utf-8").splitlines())) > 450
    }
    assert long == {}
