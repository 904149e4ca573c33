"""In-process engine speed (no NATS, no HTTP): prefill time and decode tokens/s.

    .venv/bin/python scripts/bench_engine.py [--dtype bfloat16] [--threads 1 2] [--prompt-tokens 512]

Prefill: wall time of a ``max_tokens=1`` request on a fresh prompt (ms). Decode: a batch of
64-token prompts generates 33 tokens; the same batch's 1-token run (prompt only, served from the
prefix cache after the first pass) is subtracted, leaving 32 decode steps per sequence.
"""

from __future__ import annotations

import argparse
import time

from tandem.engine.config import EngineConfig
from tandem.engine.engine import LLMEngine
from tandem.engine.weights import prepare_model
from tandem.protocol import SamplingParams


def timed(engine: LLMEngine, prompts: list[list[int]], max_tokens: int) -> float:
    """Seconds to generate ``max_tokens`` greedy tokens for every prompt."""
    t0 = time.perf_counter()
    engine.generate(prompts, SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    args = ap.parse_args()
    model_dir = prepare_model()
    for threads in args.threads:
        cfg = EngineConfig(model_dir=model_dir, dtype=args.dtype, kv_cache_gb=0.5, num_threads=threads)
        engine = LLMEngine(cfg)
        timed(engine, [list(range(100, 164))], 2)  # warm-up
        prefill_ms = timed(engine, [list(range(1000, 1000 + args.prompt_tokens))], 1) * 1000
        print(f"{args.dtype} threads={threads}: {args.prompt_tokens}-token prefill {prefill_ms:.0f} ms")
        for bs in args.batches:
            prompts = [list(range(5000 + 70 * i, 5064 + 70 * i)) for i in range(bs)]
            prompt_s = timed(engine, prompts, 1)
            total_s = timed(engine, prompts, 33)
            print(f"  batch {bs}: decode {bs * 32 / (total_s - prompt_s):.1f} tok/s")


if __name__ == "__main__":
    main()
