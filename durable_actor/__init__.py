"""durable-actor: durable execution of SQL workflows inside PostgreSQL.

The SQL surface (the ``df`` schema) is the product; this package is the runtime beside the
database and the tools to install and operate it.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("durable-actor")
except PackageNotFoundError:  # pragma: no cover - running from a checkout without install
    __version__ = "0.0.0"

__all__ = ["__version__"]
