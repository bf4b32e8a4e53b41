"""20 queued generations with steering toggled at random through the real server (the 200-run version is
benchmarks/load_server.py): bitwise twins, no hooks left, bounded memory."""

import pytest

from load_sequence import run_load

pytest_plugins = ["comfy_server"]
pytestmark = pytest.mark.comfy_server

RSS_GROWTH_LIMIT_MB = 64  # 20 small runs; a leak of the model or pack per run would exceed this fast


def test_twenty_random_toggled_runs(comfyui):
    result = run_load(comfyui, runs=20, seed=1, log=lambda *_: None)
    assert result["mismatches"] == []
    assert result["max_hooks_after_a_run"] == 0
    assert result["rss_growth_mb"] < RSS_GROWTH_LIMIT_MB, result
