"""KV indexer speed, side by side with NVIDIA Dynamo 1.6.1's ``RadixTree`` on the shared workload.

    .venv/bin/python scripts/bench_indexer.py [--rounds 3] [--impl auto|native|python|both] \\
        [workload options]
    .venv/bin/python scripts/bench_indexer.py --compare-dynamo /tmp/peers/venv/bin/python \\
        [--check expected.json] [--json]

Workload: ``../shared/peers/workload.py kv`` (``--peers DIR`` to point elsewhere), default 16
workers, 10,000 sequences x 64 blocks, 200 Zipf-shared prefixes, LRU 16,384 blocks per worker,
10,000 queries of 64 blocks; the workload options are the same as ``workload.py kv``'s.

tandem's side, in this process, with the radix tree implementation ``--impl`` picks
(:mod:`tandem.kvbm.radix`): ``native`` (the C extension), ``python`` (the pure-Python reference),
``both`` (each round runs both), or ``auto`` (default: the one the indexer uses, native when built
unless ``TANDEM_RADIX=python``). The report names the implementation of every number.

* **apply**: every workload event becomes one msgpack ``KvEventBatch`` message (encoded *before*
  timing, as Dynamo's side JSON-encodes before timing); the timed loop hands each message to the
  indexer's own handler, ``KvIndexer._apply_payload`` (decode: the native tree's C parser, else
  msgspec; restart/gap checks; ``apply``), on a fresh indexer. Reported: events/s, stored
  blocks/s, block ops/s (stored + removed blocks).
* **find**: every query (local hashes) is turned into sequence hashes first (tandem's
  ``OverlapQuery`` carries sequence hashes; the router computes them), then each
  ``RadixTree.find_matches`` call is timed: p50/p99/mean in microseconds, percentiles as in
  ``dynamo_radix_bench.py``.

The garbage collector stays enabled on both sides (tandem decodes into ``gc=False`` Structs).

Dynamo's side (``--compare-dynamo PYTHON``): ``dynamo_radix_bench.py --repeat 1 --workload DIR``
in that interpreter, alternating with tandem's runs, ``--rounds`` times (the machine's speed drifts
by hours, so only ratios from the same sitting count). Ratios compare best against best: highest
apply rate, lowest p50/p99 of each side (Dynamo's find has a bimodal per-call floor, so its best
round is the fair reference). Goals checked: apply >= 2x Dynamo's stored blocks/s, find p50 <= 0.5x
Dynamo's, find p99 < 50 us.

``--check FILE``: compare tandem's scores (of each implementation run) with the
``find_matches(early_exit=False)`` scores in FILE (written by ``dynamo_radix_bench.py --check
FILE``; written here first with Dynamo when FILE does not exist and ``--compare-dynamo`` is
given), after checking that FILE was made from the same workload (sha256 of events and queries).
Exit status 1 if any score differs.

``--json``: print one JSON document instead of the table.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path
from typing import Any

import structlog

from tandem.kvbm import radix
from tandem.kvbm.radix import BaseRadixTree
from tandem.protocol import Subjects
from tandem.protocol.messages import (
    KvEvent,
    KvEventBatch,
    KvRemoved,
    KvStored,
    StoredBlock,
    encode,
)
from tandem.services.indexer import KvIndexer

REPO = Path(__file__).resolve().parent.parent
DEFAULT_PEERS = REPO.parent / "shared" / "peers"
APPLY_GOAL = 2.0  # x Dynamo's stored blocks/s
FIND_P50_GOAL = 0.5  # x Dynamo's p50
FIND_P99_LIMIT_US = 50.0


def load_peers(peers: Path) -> Any:
    """Import ``workload.py`` from the peer harness directory; exit with a message if missing."""
    if not (peers / "workload.py").is_file():
        sys.exit(
            f"bench_indexer: {peers}/workload.py not found; pass --peers DIR "
            "(the shared peer harness with workload.py and dynamo_radix_bench.py)"
        )
    sys.path.insert(0, str(peers))
    import workload

    return workload


def pct(xs: list[float], q: float) -> float:
    """Percentile exactly as ``dynamo_radix_bench.py`` computes it (nearest rank, rounded)."""
    ys = sorted(xs)
    k = min(len(ys) - 1, max(0, round(q * (len(ys) - 1))))
    return ys[k]


def sha256_lines(rows: list[Any]) -> str:
    """sha256 of compact JSON lines, as ``dynamo_radix_bench.py --check`` records the workload."""
    h = hashlib.sha256()
    for r in rows:
        h.update(json.dumps(r, separators=(",", ":")).encode())
        h.update(b"\n")
    return h.hexdigest()


def to_messages(W: Any, wl: Any) -> list[tuple[str, bytes]]:
    """One ``(worker_id, msgpack KvEventBatch)`` per workload event, in order."""
    out = []
    for e in wl.events:
        data: KvStored | KvRemoved
        if isinstance(e, W.StoredEvent):
            blocks = [StoredBlock(block_hash=s, tokens_hash=lh) for s, lh in e.blocks]
            data = KvStored(blocks=blocks, parent_hash=e.parent_hash)
        else:
            data = KvRemoved(block_hashes=list(e.block_hashes))
        w = str(e.worker_id)
        batch = KvEventBatch(worker_id=w, events=[KvEvent(event_id=e.event_id, data=data)])
        out.append((w, encode(batch)))
    return out


def new_indexer(impl: str) -> KvIndexer:
    """A KvIndexer with no NATS connection: only its event handler and tree are used."""
    svc = types.SimpleNamespace(js=None, subjects=Subjects("bench"), log=structlog.get_logger("bench"))
    ix = KvIndexer(svc, radix_impl=impl)  # type: ignore[arg-type]
    if impl != ix.tree.IMPL:
        raise RuntimeError(f"asked for the {impl} radix tree, got {ix.tree.IMPL}")
    return ix


def tandem_run(
    impl: str, msgs: list[tuple[str, bytes]], queries: list[list[int]], stored: int, removed: int
) -> tuple[dict[str, Any], BaseRadixTree]:
    """One apply + find run on a fresh indexer with the ``impl`` radix tree."""
    ix = new_indexer(impl)
    handle = ix._apply_payload
    subjects = [ix.svc.subjects.kv_events(w) for w, _ in msgs]
    payloads = [b for _, b in msgs]
    t0, c0 = time.perf_counter(), time.process_time()
    for subject, payload in zip(subjects, payloads, strict=True):
        handle(subject, payload)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    if ix.bad_payloads or ix.events != len(msgs):
        raise RuntimeError(f"indexer applied {ix.events} of {len(msgs)} events ({ix.bad_payloads} bad)")
    tree = ix.tree
    res: dict[str, Any] = {
        "apply_wall_s": round(wall, 4),
        "apply_cpu_s": round(cpu, 4),
        "apply_events_per_s": round(len(msgs) / wall, 1),
        "apply_stored_blocks_per_s": round(stored / wall, 1),
        "apply_block_ops_per_s": round((stored + removed) / wall, 1),
        "tree_blocks": tree.num_blocks(),
    }
    best = sum(max(tree.find_matches(q).values(), default=0) for q in queries)
    res["mean_best_match_blocks"] = round(best / len(queries), 3)
    find = tree.find_matches
    pc = time.perf_counter_ns
    lat = []
    t0 = time.perf_counter()
    for q in queries:
        s = pc()
        find(q)
        lat.append(pc() - s)
    wall = time.perf_counter() - t0
    us = [x / 1000 for x in lat]
    res["find"] = {
        "median_us": round(pct(us, 0.5), 2),
        "p99_us": round(pct(us, 0.99), 2),
        "mean_us": round(sum(us) / len(us), 2),
        "queries_per_s": round(len(queries) / wall, 1),
    }
    return res, tree


def dynamo_run(python: str, peers: Path, wl_dir: str, out: str) -> dict[str, Any]:
    """One ``dynamo_radix_bench.py --repeat 1`` run in the given interpreter."""
    cmd = [python, str(peers / "dynamo_radix_bench.py"), "--repeat", "1", "--workload", wl_dir, "--out", out]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"bench_indexer: Dynamo's bench failed ({' '.join(cmd)}):\n{proc.stderr[-3000:]}")
    with open(out) as f:
        doc: dict[str, Any] = json.load(f)
    return doc


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Best (max rates, min latencies) and median over runs."""
    out: dict[str, Any] = {"best": {}, "median": {}}
    for k in ("apply_events_per_s", "apply_stored_blocks_per_s", "apply_block_ops_per_s"):
        vals = [r[k] for r in runs]
        out["best"][k] = max(vals)
        out["median"][k] = statistics.median(vals)
    out["best"]["find"] = {}
    out["median"]["find"] = {}
    for m in ("median_us", "p99_us", "mean_us", "queries_per_s"):
        vals = [r["find"][m] for r in runs]
        out["best"]["find"][m] = max(vals) if m == "queries_per_s" else min(vals)
        out["median"]["find"][m] = statistics.median(vals)
    return out


def run_check(
    path: str, W: Any, wl: Any, tree: BaseRadixTree, seq_queries: list[list[int]]
) -> dict[str, Any]:
    """Compare tandem's scores with Dynamo's expected ``find_matches`` results in ``path``."""
    with open(path) as f:
        doc = json.load(f)
    exp_wl = doc["workload"]
    ev_rows = [{"worker_id": w, "event": d} for w, d in wl.dynamo_events()]
    same = {
        "params": exp_wl["params"] == W.asdict(wl.params),
        "events_sha256": exp_wl["events_sha256"] == sha256_lines(ev_rows),
        "queries_sha256": exp_wl["queries_sha256"] == sha256_lines(wl.queries),
    }
    mismatches = []
    for row in doc["queries"]:
        i = row["i"]
        if row["query"] != wl.queries[i]:
            mismatches.append({"i": i, "error": "query differs from the workload's"})
            continue
        got = sorted([int(w), 0, s] for w, s in tree.find_matches(seq_queries[i]).items())
        if got != row["scores"]:
            mismatches.append({"i": i, "dynamo": row["scores"], "tandem": got})
    return {
        "file": path,
        "dynamo": doc.get("dynamo"),
        "queries": len(doc["queries"]),
        "queries_with_matches": sum(1 for r in doc["queries"] if r["scores"]),
        "same_workload": same,
        "mismatches": len(mismatches),
        "first_mismatches": mismatches[:5],
        "ok": all(same.values()) and not mismatches,
    }


def fmt_rate(x: float) -> str:
    return f"{x / 1e3:,.0f}k"


def print_table(doc: dict[str, Any]) -> None:
    d = doc.get("dynamo")
    print(f"workload: {json.dumps(doc['workload_stats'])}")
    print(
        f"rounds: {doc['rounds']} (tandem in-process: {', '.join(doc['impls'])} radix tree; "
        f"Dynamo {doc.get('dynamo_version') or 'not run'})"
    )
    rows = [
        ("apply stored blocks/s", "apply_stored_blocks_per_s"),
        ("apply events/s", "apply_events_per_s"),
        ("apply block ops/s", "apply_block_ops_per_s"),
    ]
    for impl in doc["impls"]:
        t = doc["tandem"][impl]
        print(f"\n[tandem {impl}]")
        head = f"{'':28s} {'tandem best':>12s} {'tandem med':>11s}"
        if d:
            head += f" {'Dynamo best':>12s} {'Dynamo med':>11s} {'ratio best':>11s}"
        print(head)
        for label, key in rows:
            line = f"{label:28s} {fmt_rate(t['best'][key]):>12s} {fmt_rate(t['median'][key]):>11s}"
            if d:
                line += f" {fmt_rate(d['best'][key]):>12s} {fmt_rate(d['median'][key]):>11s}"
                line += f" {t['best'][key] / d['best'][key]:>10.2f}x"
            print(line)
        for label, m in (
            ("find p50 (us)", "median_us"),
            ("find p99 (us)", "p99_us"),
            ("find mean (us)", "mean_us"),
        ):
            line = f"{label:28s} {t['best']['find'][m]:>12.2f} {t['median']['find'][m]:>11.2f}"
            if d:
                line += f" {d['best']['find'][m]:>12.2f} {d['median']['find'][m]:>11.2f}"
                line += f" {t['best']['find'][m] / d['best']['find'][m]:>10.2f}x"
            print(line)
        for g in doc["goals"][impl]:
            print(f"{'PASS' if g['ok'] else 'FAIL'}  {g['goal']}: {g['value']}")
        c = doc.get("check", {}).get(impl)
        if c:
            print(
                f"{'PASS' if c['ok'] else 'FAIL'}  --check {c['file']}: {c['queries']} queries "
                f"({c['queries_with_matches']} with matches), {c['mismatches']} mismatches, "
                f"same workload {c['same_workload']}"
            )
            for m in c["first_mismatches"]:
                print(f"      {m}")
    if d:
        print(f"\nDynamo find on an empty tree (per-call floor), us: {d['find_empty_tree_us']}")


def goals_for(
    t_sum: dict[str, Any], d_sum: dict[str, Any] | None
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The goals checked for one implementation, and its ratios to Dynamo (if run)."""
    goals = [
        {
            "goal": f"find p99 < {FIND_P99_LIMIT_US:g} us (tandem best)",
            "value": t_sum["best"]["find"]["p99_us"],
            "ok": t_sum["best"]["find"]["p99_us"] < FIND_P99_LIMIT_US,
        }
    ]
    if d_sum is None:
        return goals, {}
    apply_ratio = t_sum["best"]["apply_stored_blocks_per_s"] / d_sum["best"]["apply_stored_blocks_per_s"]
    find_ratio = t_sum["best"]["find"]["median_us"] / d_sum["best"]["find"]["median_us"]
    ratios = {
        "apply_stored_blocks_per_s_best": round(apply_ratio, 3),
        "apply_stored_blocks_per_s_median": round(
            t_sum["median"]["apply_stored_blocks_per_s"] / d_sum["median"]["apply_stored_blocks_per_s"], 3
        ),
        "find_p50_best": round(find_ratio, 3),
        "find_p50_median": round(
            t_sum["median"]["find"]["median_us"] / d_sum["median"]["find"]["median_us"], 3
        ),
        "find_p99_best": round(t_sum["best"]["find"]["p99_us"] / d_sum["best"]["find"]["p99_us"], 3),
    }
    goals = [
        {
            "goal": f"apply >= {APPLY_GOAL:g}x Dynamo's stored blocks/s (best vs best)",
            "value": f"{apply_ratio:.2f}x",
            "ok": apply_ratio >= APPLY_GOAL,
        },
        {
            "goal": f"find p50 <= {FIND_P50_GOAL:g}x Dynamo's (best vs best)",
            "value": f"{find_ratio:.2f}x",
            "ok": find_ratio <= FIND_P50_GOAL,
        },
        *goals,
    ]
    return goals, ratios


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--peers", type=Path, default=DEFAULT_PEERS, help="peer harness dir (workload.py)")
    ap.add_argument("--compare-dynamo", metavar="PYTHON", help="interpreter with ai-dynamo (a separate venv)")
    ap.add_argument("--rounds", type=int, default=3, help="alternating runs per side")
    ap.add_argument(
        "--impl",
        choices=("auto", "native", "python", "both"),
        default="auto",
        help="tandem radix tree: auto (the indexer's: native when built, unless TANDEM_RADIX=python), "
        "native, python, or both",
    )
    ap.add_argument("--check", metavar="FILE", help="expected scores from dynamo_radix_bench.py --check")
    ap.add_argument("--json", action="store_true", help="print one JSON document instead of the table")
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--peers", type=Path, default=DEFAULT_PEERS)
    W = load_peers(pre.parse_known_args()[0].peers.resolve())
    W._add_dataclass_args(ap, W.KvParams)
    args = ap.parse_args()
    peers = args.peers.resolve()
    if args.compare_dynamo and not (peers / "dynamo_radix_bench.py").is_file():
        sys.exit(f"bench_indexer: {peers}/dynamo_radix_bench.py not found")
    if args.impl == "both":
        impls = ["native", "python"]
    elif args.impl == "auto":
        impls = [radix.RadixTree.IMPL]
    else:
        impls = [args.impl]
    if "native" in impls and not radix.NATIVE_AVAILABLE:
        sys.exit(
            "bench_indexer: the native radix tree is not built (pip install --no-deps -e . with a C compiler)"
        )

    log = (lambda *a: print(*a, file=sys.stderr)) if args.json else print
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))  # warnings off
    params = W._from_args(W.KvParams, args)
    wl = W.build_kv_workload(params)
    msgs = to_messages(W, wl)
    seq_queries = [W.seq_hashes(q) for q in wl.queries]
    stored = sum(len(e.blocks) for e in wl.events if isinstance(e, W.StoredEvent))
    removed = sum(len(e.block_hashes) for e in wl.events if isinstance(e, W.RemovedEvent))
    log(f"workload built: {json.dumps(wl.stats)}")
    log(f"tandem radix tree: {', '.join(impls)} (native extension built: {radix.NATIVE_AVAILABLE})")

    tmp = tempfile.TemporaryDirectory(prefix="bench_indexer_")
    wl_dir = os.path.join(tmp.name, "workload")
    dynamo_version = None
    if args.compare_dynamo:
        wl.write(wl_dir)
        if args.check and not os.path.exists(args.check):
            log(f"writing {args.check} with Dynamo")
            cmd = [
                args.compare_dynamo,
                str(peers / "dynamo_radix_bench.py"),
                "--check",
                args.check,
                "--workload",
                wl_dir,
            ]
            subprocess.run(cmd, check=True, stdout=sys.stderr if args.json else None)
    if args.check and not os.path.exists(args.check):
        sys.exit(
            f"bench_indexer: {args.check} not found (write it with dynamo_radix_bench.py --check, "
            "or pass --compare-dynamo)"
        )

    gc.collect()
    t_runs: dict[str, list[dict[str, Any]]] = {impl: [] for impl in impls}
    d_runs: list[dict[str, Any]] = []
    for r in range(args.rounds):
        for impl in impls:
            res, tree = tandem_run(impl, msgs, seq_queries, stored, removed)
            t_runs[impl].append(res)
            log(
                f"round {r} tandem {impl}: apply {fmt_rate(res['apply_stored_blocks_per_s'])} "
                f"stored blocks/s, find p50 {res['find']['median_us']} us p99 {res['find']['p99_us']} us"
            )
            del tree
            gc.collect()
        if args.compare_dynamo:
            doc = dynamo_run(args.compare_dynamo, peers, wl_dir, os.path.join(tmp.name, f"dynamo{r}.json"))
            dynamo_version = doc.get("dynamo")
            run = doc["runs"][0]
            run["find_empty_tree_us"] = doc["find_empty_tree_us"]
            d_runs.append(run)
            log(
                f"round {r} Dynamo: apply {fmt_rate(run['apply_stored_blocks_per_s'])} stored blocks/s, "
                f"find p50 {run['find']['median_us']} us p99 {run['find']['p99_us']} us "
                f"(empty-tree floor {run['find_empty_tree_us']} us)"
            )
            gc.collect()
    d_sum = None
    if d_runs:
        d_sum = summarize(d_runs)
        d_sum["find_empty_tree_us"] = min(r["find_empty_tree_us"] for r in d_runs)
    out: dict[str, Any] = {
        "tool": "scripts/bench_indexer.py",
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "params": W.asdict(params),
        "workload_stats": {k: v for k, v in wl.stats.items() if k != "build_s"},
        "rounds": args.rounds,
        "impls": impls,
        "native_available": radix.NATIVE_AVAILABLE,
        "tandem": {impl: {"runs": t_runs[impl], **summarize(t_runs[impl])} for impl in impls},
        "dynamo_version": dynamo_version,
        "goals": {},
    }
    if d_sum is not None:
        out["dynamo"] = {"runs": d_runs, **d_sum}
        out["ratios"] = {}
    for impl in impls:
        goals, ratios = goals_for(out["tandem"][impl], d_sum)
        out["goals"][impl] = goals
        if ratios:
            out["ratios"][impl] = ratios
    status = 0
    if args.check:
        out["check"] = {}
        for impl in impls:
            ix = new_indexer(impl)
            for w, payload in msgs:
                ix._apply_payload(ix.svc.subjects.kv_events(w), payload)
            out["check"][impl] = run_check(args.check, W, wl, ix.tree, seq_queries)
            if not out["check"][impl]["ok"]:
                status = 1
    if args.json:
        print(json.dumps(out, indent=1))
    else:
        print_table(out)
    tmp.cleanup()
    return status


if __name__ == "__main__":
    raise SystemExit(main())
