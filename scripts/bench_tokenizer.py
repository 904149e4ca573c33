"""Prompt tokenizing speed: the tokenizers library against the checked tiktoken encoder.

Encodes the same texts (this repository's sources and docs in 3,000-character pieces, plus
synthetic prompts of words and numbers) with each path the frontend can use, checks that the
ids are identical, and prints characters/s and the ratios, all from one run::

    .venv/bin/python scripts/bench_tokenizer.py [--repeat 5] [--model-dir DIR]

Paths: ``tokenizers encode`` (one text at a time), ``tokenizers encode_batch_fast`` (one batch
call, spread over the cores), ``tiktoken one by one`` (``Tokenizer.encode_ordinary_batch``, what
the frontend's batch encoder calls). The best of ``--repeat`` timings is reported.
"""

from __future__ import annotations

import argparse
import random
import time
from collections.abc import Callable
from pathlib import Path

from tandem.engine.tokenizer import Tokenizer


def corpus(root: Path) -> list[str]:
    texts: list[str] = []
    for path in sorted([*root.glob("tandem/**/*.py"), *root.glob("docs/*.md")]):
        text = path.read_text(encoding="utf-8")
        texts += [text[i : i + 3000] for i in range(0, len(text), 3000)]
    words = ["amber", "basalt", "cedar", "delta", "ember", "fjord", "garnet", "harbor", "iris", "juniper"]
    for seed in range(300):
        rnd = random.Random(seed)
        texts.append(" ".join(rnd.choice(words) + str(rnd.randrange(1000)) for _ in range(175)))
    return [t for t in texts if "<|" not in t]  # no added-token strings in ordinary text


def best_of(repeat: int, fn: Callable[[], list[list[int]]]) -> tuple[float, list[list[int]]]:
    best, out = float("inf"), []
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--model-dir", default=None, help="prepared model directory (default: prepare_model())")
    args = ap.parse_args()
    if args.model_dir:
        model_dir = Path(args.model_dir)
    else:
        from tandem.engine.weights import prepare_model

        model_dir = prepare_model()
    t0 = time.perf_counter()
    fast = Tokenizer(model_dir, fast_encoder=True)
    print(f"fast encoder: {fast.fast_encoder_status} (built and checked in {time.perf_counter() - t0:.2f} s)")
    texts = corpus(Path(__file__).resolve().parent.parent)
    chars = sum(map(len, texts))
    print(f"{len(texts)} texts, {chars} characters")
    hf = fast._tk  # the wrapped tokenizers.Tokenizer
    paths: dict[str, Callable[[], list[list[int]]]] = {
        "tokenizers encode": lambda: [hf.encode(t, add_special_tokens=False).ids for t in texts],
        "tokenizers encode_batch_fast": lambda: fast.encode_batch(texts),
        "tiktoken one by one": lambda: fast.encode_ordinary_batch(texts),
    }
    seconds: dict[str, float] = {}
    reference: list[list[int]] | None = None
    for name, fn in paths.items():
        seconds[name], ids = best_of(args.repeat, fn)
        if reference is None:
            reference = ids
        elif ids != reference:
            raise SystemExit(f"{name}: ids differ from tokenizers encode")
        print(f"  {name:30s} {seconds[name] * 1e3:8.1f} ms  {chars / seconds[name] / 1e6:6.2f} M chars/s")
    tiktoken = seconds["tiktoken one by one"]
    print(f"tiktoken / encode_batch_fast time: {tiktoken / seconds['tokenizers encode_batch_fast']:.2f}")
    print(f"tiktoken / encode time:            {tiktoken / seconds['tokenizers encode']:.2f}")


if __name__ == "__main__":
    main()
