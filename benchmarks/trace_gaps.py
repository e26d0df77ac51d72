"""Where a step's GPU waited on the host: reads a Chrome trace written by `bench_e2e.py --trace`
and lists the longest stretches with no kernel running, each with the host ops that were open
(the outermost first) while it lasted.

    python benchmarks/trace_gaps.py trace-123-0.json.gz [--top 25] [--min-ms 0.2] [--ops]

A launch-bound step shows as many gaps between kernels; this says which parts of the trainer's
host code they fall in, summed by op, so the fix goes where the time is.
"""
from __future__ import annotations

import argparse
import bisect
import collections
import gzip
import json


def load(path: str) -> list[dict]:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        data = json.load(f)
    return data["traceEvents"] if isinstance(data, dict) else data


def gaps(events: list[dict], min_us: float) -> tuple[list[tuple[float, float]], float, float]:
    """Intervals with no GPU kernel or copy running, the kernels' busy time and the span."""
    busy = sorted((e["ts"], e["ts"] + e.get("dur", 0)) for e in events
                  if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset"))
    if not busy:
        raise SystemExit("no GPU kernels in this trace: was it recorded with CUDA activity?")
    idle, end, total = [], busy[0][1], busy[0][1] - busy[0][0]
    for start, stop in busy[1:]:
        if start - end >= min_us:
            idle.append((end, start))
        total += max(0.0, stop - max(start, end))
        end = max(end, stop)
    return idle, total, end - busy[0][0]


def op_counts(events: list[dict]) -> dict[object, collections.Counter]:
    """Host ops by name, per thread (the main thread runs the forwards and the optimizer; autograd's
    own thread the backward): where a launch-bound step spends its launches."""
    counts: dict[object, collections.Counter] = collections.defaultdict(collections.Counter)
    for e in events:
        if e.get("ph") == "X" and e.get("cat") == "cpu_op":
            counts[e.get("tid")][e["name"]] += 1
    return dict(counts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("trace")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--min-ms", type=float, default=0.2, help="shortest gap that counts")
    ap.add_argument("--ops", action="store_true", help="also count the host ops by name on each thread")
    args = ap.parse_args()
    events = load(args.trace)
    if args.ops:
        for tid, counter in sorted(op_counts(events).items(), key=lambda kv: -sum(kv[1].values())):
            print(f"thread {tid}: {sum(counter.values())} host ops")
            for name, n in counter.most_common(args.top):
                print(f"{n:8d}  {name}")
        print()
    idle, busy, span = gaps(events, args.min_ms * 1e3)
    host = sorted((e["ts"], e["ts"] + e.get("dur", 0), e["name"]) for e in events
                  if e.get("ph") == "X" and e.get("cat") in ("cpu_op", "python_function", "user_annotation"))
    starts = [h[0] for h in host]
    by_op: collections.Counter = collections.Counter()
    rows = []
    for a, b in idle:
        # host ops open over the gap's middle: the call chain the GPU was waiting on
        mid = (a + b) / 2
        open_ops = [h for h in host[:bisect.bisect_right(starts, mid)] if h[1] >= mid]
        chain = [name for _, _, name in sorted(open_ops, key=lambda h: h[0])]
        for name in set(chain):
            by_op[name] += b - a
        rows.append((b - a, chain))
    waited = sum(b - a for a, b in idle)
    print(f"span {span / 1e3:.1f} ms: kernels busy {busy / 1e3:.1f} ms, {len(idle)} gaps of >= {args.min_ms} ms "
          f"totalling {waited / 1e3:.1f} ms")
    print(f"\nlongest gaps (ms, then the host ops open during them, outermost first):")
    for ms, chain in sorted(rows, key=lambda r: -r[0])[:args.top]:
        print(f"{ms / 1e3:8.2f}  {' > '.join(chain[-6:]) or '(no host op open)'}")
    print(f"\nhost ops by GPU time waited inside them (ms; an op counts every gap it was open over):")
    for name, us in by_op.most_common(args.top):
        print(f"{us / 1e3:8.2f}  {name}")


if __name__ == "__main__":
    main()
