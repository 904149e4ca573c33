"""Command line of ``python -m tandem.services.router``: flags derived from :class:`RouterConfig`."""

from __future__ import annotations

import argparse

from tandem.config import add_arguments, from_namespace
from tandem.services.runtime import ServiceBase, common_parser, run_service

from .config import RouterConfig
from .service import SERVICE, PrefillRouter


def build_parser() -> argparse.ArgumentParser:
    """``common_parser`` (``--nats-url``, ``--namespace``, ``--log-level``) + one flag per
    :class:`RouterConfig` field (Dynamo's names; old tandem names as aliases)."""
    p = common_parser(SERVICE, "Prefill router: worker choice (--router-mode) and prefill → decode hand-off.")
    add_arguments(p.add_argument_group("routing"), RouterConfig)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m tandem.services.router``; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = from_namespace(RouterConfig, args)
    except ValueError as e:
        parser.error(str(e))

    async def setup(svc: ServiceBase) -> None:
        await PrefillRouter(svc, config).start()

    return run_service(setup, SERVICE, args)


__all__ = ["build_parser", "main"]
