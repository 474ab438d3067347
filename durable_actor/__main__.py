"""``python -m durable_actor`` runs the CLI."""

from __future__ import annotations

from durable_actor.cli import main

main()
