"""skufleet: a Celery worker fleet that turns product catalogues into Stable Diffusion images,
with a SQL ledger as the source of truth.

The installed package is ``skufleet`` only. In the repository its parts keep their own
top-level folders (``schemas/``, ``producer/``, ``worker/``, ``migrations/``, ``examples/``);
this folder links them in as ``skufleet.schemas``, ``skufleet.producer``, ``skufleet.worker``,
``skufleet.migrations`` and ``skufleet.examples`` (packs, example catalogues, label fonts), and
a wheel holds them as real subpackages and data. Imports go one way:
``schemas`` imports neither of the others, and ``producer`` and ``worker`` never import
each other (``tests/test_imports.py``).
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("skufleet")
except PackageNotFoundError:  # running from a checkout that is not installed
    __version__ = "0+unknown"
