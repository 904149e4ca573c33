"""In-process engine speed (no NATS, no HTTP): prefill time and decode tokens/s.

    .venv/bin/python scripts/bench_engine.py [--dtype bfloat16] [--threads 1 2] [--prompt-tokens 512]
    .venv/bin/python scripts/bench_engine.py --dtype float32 --deterministic  # batch-invariant mode
    .venv/bin/python scripts/bench_engine.py --engine mock [--speedup-ratio 1]

Prefill: time of a ``max_tokens=1`` request on a fresh prompt (ms). Decode: a batch of 64-token
prompts generates 33 tokens; the same batch's 1-token run (prompt only, served from the prefix
cache after the first pass) is subtracted, leaving 32 decode steps per sequence. ``--repeat N``
runs every measurement N times on fresh prompts and keeps the fastest (a busy machine).

``--shared-prefix N`` adds one measurement: ``--shared-batch`` requests whose prompts share their
first ``N`` tokens (then 32 tokens of their own) arrive together; it reports the tokens computed
(the prefix once: the later requests take the blocks the first computes in the same step) against
computing every prompt whole, and the time until all of them have their first token. Give it a
step budget that holds the burst (``--max-num-batched-tokens 8192``, Dynamo's mocker default),
else the prompts are chunked over several steps anyway.

``--engine model`` (default) measures wall time. ``--engine mock`` runs no model: it reports the
simulated time (Dynamo's mocker timing model, divided by ``--speedup-ratio``; what a worker would
wait) and, separately, the engine's own CPU overhead (wall time of the steps).
"""

from __future__ import annotations

import argparse
import time

from tandem.engine.config import EngineConfig
from tandem.engine.engine import LLMEngine
from tandem.protocol import SamplingParams


def timed(engine: LLMEngine, prompts: list[list[int]], max_tokens: int) -> tuple[float, float]:
    """``(wall_s, simulated_s)`` to generate ``max_tokens`` greedy tokens for every prompt."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, seed=0)
    for i, p in enumerate(prompts):
        engine.add_request(f"bench-{time.monotonic_ns()}-{i}", p, params)
    simulated = 0.0
    t0 = time.perf_counter()
    while engine.has_unfinished():
        engine.step()
        simulated += engine.last_step_simulated_s
    return time.perf_counter() - t0, simulated


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engine", default="model", choices=["model", "mock"])
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="model engine only")
    ap.add_argument("--speedup-ratio", type=float, default=1.0, help="mock engine only")
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--repeat", type=int, default=1, help="runs per measurement; the fastest counts")
    ap.add_argument("--max-num-batched-tokens", type=int, default=None, help="step budget (tokens)")
    ap.add_argument("--shared-prefix", type=int, default=0, help="tokens shared by a burst (0 = skip)")
    ap.add_argument("--shared-batch", type=int, default=4, help="requests in the shared-prefix burst")
    ap.add_argument(
        "--deterministic",
        action="store_true",
        help="model engine: batch-invariant mode (EngineConfig.deterministic)",
    )
    args = ap.parse_args()
    budget = (
        {} if args.max_num_batched_tokens is None else {"max_num_batched_tokens": args.max_num_batched_tokens}
    )
    if args.engine == "mock":
        configs = [
            (
                "mock",
                EngineConfig(
                    engine="mock",
                    dtype=args.dtype,
                    kv_cache_gb=0.5,
                    speedup_ratio=args.speedup_ratio,
                    **budget,
                ),
            )
        ]
    else:
        from tandem.engine.weights import prepare_model

        model_dir = str(prepare_model())
        configs = [
            (
                f"threads={t}",
                EngineConfig(
                    model_dir=model_dir,
                    dtype=args.dtype,
                    kv_cache_gb=0.5,
                    num_threads=t,
                    deterministic=args.deterministic,
                    **budget,
                ),
            )
            for t in args.threads
        ]
    mock = args.engine == "mock"
    for label, cfg in configs:
        engine = LLMEngine(cfg)
        timed(engine, [list(range(100, 164))], 2)  # warm-up
        runs = [
            timed(engine, [list(range(1000 + 600 * r, 1000 + 600 * r + args.prompt_tokens))], 1)
            for r in range(args.repeat)
        ]
        wall, sim = min(runs)
        mode = " deterministic" if args.deterministic and not mock else ""
        line = (
            f"{args.dtype}{mode} {label}: {args.prompt_tokens}-token prefill "
            f"{(sim if mock else wall) * 1e3:.1f} ms"
        )
        if not mock:
            line += f" ({args.prompt_tokens / wall:.0f} tok/s)"
        print(line + (f" simulated (engine overhead {wall * 1e3:.2f} ms)" if mock else ""))
        if args.shared_prefix:
            n, b = args.shared_prefix, args.shared_batch
            runs: list[tuple[float, float, int]] = []
            for r in range(args.repeat):
                base = 30000 + 2000 * r
                prompts = [
                    [*range(base, base + n), *range(40000 + 40 * i + r, 40032 + 40 * i + r)] for i in range(b)
                ]
                computed = 0
                simulated = 0.0
                t0 = time.perf_counter()
                for i, p in enumerate(prompts):
                    engine.add_request(f"shared-{r}-{i}", p, SamplingParams(max_tokens=1, ignore_eos=True))
                while engine.has_unfinished():
                    engine.step()
                    computed += engine.last_step_tokens
                    simulated += engine.last_step_simulated_s
                runs.append((time.perf_counter() - t0, simulated, computed))
            wall, sim, computed = min(runs)
            print(
                f"  shared prefix: {b} x ({n} + 32) tokens together: {computed} tokens computed "
                f"(of {b * (n + 32)}), all first tokens after {(sim if mock else wall) * 1e3:.1f} ms"
                + (" simulated" if mock else "")
            )
        for bs in args.batches:
            # Distinct prompts for the two runs: the same ones would hit the prefix cache the
            # second time, and the difference would no longer be 32 decode steps.
            p_wall, p_sim = min(
                timed(engine, [list(range(5000 + 70 * i + r, 5064 + 70 * i + r)) for i in range(bs)], 1)
                for r in range(args.repeat)
            )
            t_wall, t_sim = min(
                timed(engine, [list(range(20000 + 70 * i + r, 20064 + 70 * i + r)) for i in range(bs)], 33)
                for r in range(args.repeat)
            )
            tokens = bs * 32
            if mock:
                print(
                    f"  batch {bs}: decode {tokens / (t_sim - p_sim):.1f} tok/s simulated "
                    f"(engine overhead {(t_wall - p_wall) / tokens * 1e6:.0f} us/token)"
                )
            else:
                print(f"  batch {bs}: decode {tokens / (t_wall - p_wall):.1f} tok/s")


if __name__ == "__main__":
    main()
