"""200 consecutive queued generations through a real ComfyUI server with SafeDIG steering toggled at
random (tiny SD3 checkpoint, random firing packs): RSS growth, hooks left on the shared model, and
bitwise agreement of every output with its single-run twin.

    .venv/bin/python benchmarks/load_server.py --runs 200     # writes benchmarks/results/load_server.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from comfy_server import start_test_server  # noqa: E402
from load_sequence import run_load  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "load_server.json"))
    args = ap.parse_args()
    server = start_test_server(Path(tempfile.mkdtemp(prefix="safedig-load-")))
    try:
        result = run_load(server, args.runs, args.seed)
    finally:
        server.stop()
    print(json.dumps(result, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0 if not result["mismatches"] and result["max_hooks_after_a_run"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
