"""Where tandem keeps what it prepares once per machine (no torch, so every service may import it).

``default_cache_dir()`` — ``$TANDEM_CACHE_DIR`` if set, else ``<repo>/.cache/models``: prepared
model directories (:func:`tandem.engine.weights.prepare_model`) and, under ``verdicts/``, the
recorded verdicts of the tokenizer's tiktoken check (:func:`tandem.engine.fast_bpe.build`).
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["REPO_ROOT", "default_cache_dir", "verdict_dir"]

#: The repository (or installed source tree) root: ``tandem/engine/paths.py`` → two levels up.
REPO_ROOT = Path(__file__).resolve().parents[2]


def default_cache_dir() -> Path:
    """``$TANDEM_CACHE_DIR`` if set, else ``<repo>/.cache/models``."""
    env = os.environ.get("TANDEM_CACHE_DIR")
    return Path(env) if env else REPO_ROOT / ".cache" / "models"


def verdict_dir() -> Path:
    """``default_cache_dir() / "verdicts"``: recorded verdicts of one-off checks."""
    return default_cache_dir() / "verdicts"
