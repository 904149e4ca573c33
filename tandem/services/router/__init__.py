"""The prefill router (``python -m tandem.services.router``), as a package:

* :mod:`.policy` — routing policies as values (``--router-mode``), busy filtering, conditional
  disaggregation; pure, NATS-free.
* :mod:`.active` — what this router has in flight per worker (Dynamo's ``ActiveSequences``).
* :mod:`.tracker` — the router-wide ``ActiveTracker``: every worker's figures column-wise, the pools.
* :mod:`.scheduler` — one decision from candidates to ranked workers (NATS-free, timed).
* :mod:`.config` — :class:`RouterConfig`, the source of the CLI flags (light import).
* :mod:`.service` — :class:`PrefillRouter`, the request life cycle over NATS.
* :mod:`.cli` — ``build_parser`` / ``main``.

``RouterConfig`` imports eagerly (no NATS); the rest loads on first use, so
``from tandem.services.router import RouterConfig`` stays light for the launcher.
See ``docs/router.md``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .config import RouterConfig

if TYPE_CHECKING:
    from .cli import build_parser, main
    from .service import MAX_ATTEMPTS, SERVICE, Phase, PrefillRouter

_LAZY = {
    "PrefillRouter": ".service",
    "Phase": ".service",
    "SERVICE": ".service",
    "MAX_ATTEMPTS": ".service",
    "build_parser": ".cli",
    "main": ".cli",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module, __name__), name)


__all__ = ["MAX_ATTEMPTS", "SERVICE", "Phase", "PrefillRouter", "RouterConfig", "build_parser", "main"]
