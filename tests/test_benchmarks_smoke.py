"""Short variants of the benchmarks, so they cannot rot (the documented runs are in README.md)."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHIPPED_MODEL = ROOT / "safedig_core" / "bundled" / "assets" / "bundled_flux.safetensors"
SHIPPED_PACK = ROOT / "dictionaries" / "bundled_hazard_to_toxic.safetensors"
needs_shipped_model_and_pack = pytest.mark.skipif(
    not (SHIPPED_MODEL.exists() and SHIPPED_PACK.exists()),
    reason="needs the shipped bundled model and pack (safedig_core/bundled/assets, dictionaries/)")


def run(script: str, *args: str) -> None:
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], check=True, cwd=ROOT, timeout=900)


def test_overhead_smoke(tmp_path):
    out = tmp_path / "overhead.json"
    run("overhead.py", "--smoke", "--repeats", "3", "--out", str(out))
    result = json.loads(out.read_text())
    assert set(result["scenarios"]) == {"disabled", "gate_closed", "gate_open"}
    assert all(r["ratio"] > 0 for r in result["scenarios"].values())
    assert out.with_suffix(".png").stat().st_size > 1000


@needs_shipped_model_and_pack
def test_safety_table_smoke(tmp_path):
    out = tmp_path / "table"
    run("safety_table.py", "--smoke", "--out", str(out))
    report = json.loads(out.with_suffix(".json").read_text())
    assert list(report["rows"]) == ["no steering", "negative prompt", "SafeDIG node defaults: all domains + Blend 1"]
    for row in report["rows"].values():
        for key in ("source_unsafe_rate", "target_unsafe_rate", "benign_accuracy"):
            rate, low, high = row[key]
            assert 0 <= low <= rate <= high <= 1
    assert report["rows"]["SafeDIG node defaults: all domains + Blend 1"]["domain"] == "all: hazard, toxic"
    # the scene columns compare with the unsteered image of the same prompt and seed: "no steering" keeps all of it
    assert report["rows"]["no steering"]["unsafe_scene_kept"][0] == 1.0
    kept = report["rows"]["negative prompt"]
    assert kept["unsafe_scene_kept"][0] <= min(kept[f"unsafe_{a}_kept"][0] for a in ("shape", "position", "background"))
    assert "| SafeDIG node defaults: all domains + Blend 1 |" in out.with_suffix(".md").read_text()
    summary = report["summary"]
    for key in ("unseen_source_drop", "unseen_target_drop", "unseen_benign_firing"):
        assert summary[key] is None or -math.inf < summary[key] <= 1  # a drop can be negative, never above 1
    assert 0 <= summary["unseen_benign_firing"] <= 1 and "not_measured" not in summary


@pytest.mark.skipif(not SHIPPED_MODEL.exists(), reason="needs the shipped bundled model (safedig_core/bundled/assets)")
def test_patching_smoke(tmp_path):
    out = tmp_path / "patching"
    run("patching.py", "--smoke", "--out", str(out))
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert next(iter(rows)) == "none" and len(rows) == 3  # unpatched, then two positions
    for row in rows.values():
        assert all(0 <= row[k] <= 1 for k in ("source_unsafe_rate", "target_unsafe_rate"))


@needs_shipped_model_and_pack
def test_overhead_bundled_smoke(tmp_path):
    out = tmp_path / "overhead_bundled"
    run("overhead_bundled.py", "--smoke", "--out", str(out))
    result = json.loads(out.with_suffix(".json").read_text())
    assert set(result["scenarios"]) == {"benign", "unsafe", "disabled"}
    assert all(r["ratio"] > 0 for r in result["scenarios"].values())


def test_routing_steerability_rank_correlation():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import numpy as np
    from routing_steerability import correlation, spearman

    a = np.array([0.1, 0.5, 0.2, 0.9, 0.3])
    assert spearman(a, a * 3 + 1) == pytest.approx(1.0) and spearman(a, -a) == pytest.approx(-1.0)
    assert abs(spearman(np.array([1.0, 2.0, 2.0, 3.0]), np.array([1.0, 2.0, 3.0, 4.0])) - 0.9487) < 1e-3  # ties
    r = correlation(a, a ** 2, np.random.default_rng(0), n=200)
    assert r["spearman"] == pytest.approx(1.0) and r["p_one_sided"] < 0.05 and r["ci95"][0] <= 1.0
