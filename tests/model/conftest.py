"""Fixtures for the model tests: the prepared SmolLM2 directory, our model, and transformers'
reference model and tokenizer loaded straight from the GGUF (fp32, offline).

Torch runs these tests single-threaded (``$TANDEM_TEST_THREADS`` overrides): on a busy 2-core
machine, 2 OpenMP threads make every small matmul wait ~10 ms for a descheduled peer thread
(a 7-token forward took 3.7 s with 2 threads, 0.15 s with 1).

The prepared directory lives in the default cache (``$TANDEM_CACHE_DIR`` or
``<repo>/.cache/models``), so it is built once and shared with every other test and process.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from tandem.engine.weights import gguf_path, load_model, prepare_model


@pytest.fixture(scope="session", autouse=True)
def _torch_threads() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("TANDEM_TEST_THREADS", "1")))
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def model_dir() -> Path:
    return prepare_model()


@pytest.fixture(scope="session")
def our_model_fp32(model_dir: Path) -> Any:
    return load_model(model_dir, torch.float32, "cpu")


@pytest.fixture(scope="session")
def hf_model() -> Any:
    """transformers' LlamaForCausalLM from the GGUF, fp32, eval mode."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")  # transformers needs it to load GGUF files
    path = gguf_path()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    )
    return model.eval().requires_grad_(False)


@pytest.fixture(scope="session")
def hf_tokenizer() -> Any:
    """transformers' tokenizer built from the GGUF metadata."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    transformers = pytest.importorskip("transformers")
    path = gguf_path()
    return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
