"""Write the bundled concept world's prompt sets as JSON-lines files in dictionaries/prompts/: the same
prompts and seeds `python -m safedig_core build-pack` collects (seed 0), for SafeDIG Build / Adapt
Dictionary. tests/test_prompt_sets.py checks the shipped files equal what this writes.

    .venv/bin/python scripts/export_prompt_sets.py
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from safedig_core.training.collect import PromptRecord, world_prompts  # noqa: E402

OUT = ROOT / "dictionaries" / "prompts"
# file name -> (world set, prompts per concept, seed): build-pack's --n-source / --n-target / --n-benign and
# --n-calib defaults (its tau calibration set is drawn with seed + 1)
BUNDLED_SETS = {
    "bundled_source_pairs.jsonl": ("source", 40, 0),
    "bundled_target_pairs.jsonl": ("target", 32, 0),
    "bundled_benign.jsonl": ("benign", 20, 0),
    "bundled_benign_calibration.jsonl": ("benign", 40, 1),
}
LABELS = {1: "unsafe", 0: "safe"}


def to_line(record: PromptRecord) -> str:
    row = asdict(record)
    row["label"] = "benign" if record.pair < 0 else LABELS[record.label]
    if record.pair < 0:
        del row["pair"]
    return json.dumps({k: row[k] for k in ("text", "label", "pair", "subdomain", "concept", "seed") if k in row})


def bundled_lines(name: str) -> str:
    kind, n, seed = BUNDLED_SETS[name]
    return "".join(to_line(r) + "\n" for r in world_prompts(kind, n, seed))


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    for name in BUNDLED_SETS:
        (OUT / name).write_text(bundled_lines(name), encoding="utf-8")
        print(f"wrote {OUT / name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
