"""The one error tree of skufleet.

Every error a skufleet process raises on purpose derives from :class:`SkufleetError`, and its
type says what the caller should do::

    SkufleetError
    ├── ConfigError            bad settings or arguments: fix them and run again
    │   └── SchemaMissingError the ledger's tables are missing or outdated: `skufleet db upgrade`
    ├── CatalogueError         the catalogue cannot be read at all (file, header, encoding)
    ├── RetryableError         a dependency is unreachable: retry with backoff, up to the cap
    │   ├── StorageUnavailable     the S3 endpoint failed or timed out
    │   ├── LedgerUnavailable      the SQL database failed or timed out
    │   └── BrokerUnavailable      Redis refused or timed out
    ├── ItemError              permanent for one item (bad prompt, unsafe key): fail it now
    └── FatalError             the process cannot go on (model will not load, device lost):
        ├── ModelLoadError         stop, and let the supervisor decide
        └── DeviceError

Third-party errors (botocore, SQLAlchemy, torch) are translated into these at the edge of the
module that calls the library.
"""

from __future__ import annotations


class SkufleetError(Exception):
    """Base class of every error skufleet raises on purpose."""


class ConfigError(SkufleetError):
    """A setting or argument is invalid; the message names it and the bad value."""


class SchemaMissingError(ConfigError):
    """The ledger's tables are missing or at another revision than this code expects."""


class CatalogueError(SkufleetError):
    """The catalogue cannot be processed at all (as opposed to one bad record)."""


class RetryableError(SkufleetError):
    """A dependency failed in a way that may pass: retry with backoff, up to the cap."""


class StorageUnavailable(RetryableError):
    """The object store refused, failed or timed out."""


class LedgerUnavailable(RetryableError):
    """The SQL ledger refused, failed or timed out."""


class BrokerUnavailable(RetryableError):
    """The message broker refused, failed or timed out."""


class ItemError(SkufleetError):
    """Permanent for one item: retrying cannot help, so the item fails at once."""


class FatalError(SkufleetError):
    """The process cannot continue; it stops and its supervisor decides what next."""


class ModelLoadError(FatalError):
    """The diffusion pipeline could not be loaded."""


class DeviceError(FatalError):
    """The accelerator is missing or keeps failing."""
