"""Documented fuzz run of pack loading (issue: hostile input). Mutates a valid pack N times (header JSON,
lengths, dtypes, shapes, offsets, metadata values, metadata of the wrong JSON type at any field,
truncation, tensor bytes) and checks that every case either loads as a valid pack or raises PackError
with a clear message, and that the header pass alone agrees; records outcomes, the slowest case and
peak memory.

    .venv/bin/python benchmarks/fuzz_packs.py --cases 10000      # writes benchmarks/results/fuzz_packs.json
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402

from pack_fuzz import base_pack_bytes, check_outcome, mutated_pack  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=10_000)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "fuzz_packs.json"))
    args = ap.parse_args()

    outcomes: Counter = Counter()
    slowest = 0.0
    tmp = Path(tempfile.mkdtemp(prefix="safedig-fuzz-"))
    base = base_pack_bytes(tmp)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    @settings(max_examples=args.cases, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(case=mutated_pack(base))
    def run(case):
        nonlocal slowest
        kind, data = case
        path = tmp / "fuzzed.safetensors"
        path.write_bytes(data)
        t0 = time.perf_counter()
        outcomes[(kind, check_outcome(path))] += 1
        slowest = max(slowest, time.perf_counter() - t0)
        done = sum(outcomes.values())
        if done % 1000 == 0:
            print(f"{done} cases", flush=True)

    start = time.perf_counter()
    run()
    total = sum(outcomes.values())
    result = {
        "cases": total,
        "outcomes": {f"{k}/{o}": n for (k, o), n in sorted(outcomes.items())},
        "other_exceptions": 0,  # any other exception aborts the run above
        "slowest_case_s": round(slowest, 4),
        "wall_s": round(time.perf_counter() - start, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "rss_before_mb": round(rss_before, 1),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
