"""Many queued generations through one real ComfyUI server with steering toggled at random: shared by
the CI test (20 runs) and the documented benchmark (benchmarks/load_server.py, 200 runs).

Each configuration is run once first (its single-run twin); every later run must give a latent bitwise
equal to its twin, leave no hook on the shared model, and the server's RSS must stay bounded."""

from __future__ import annotations

import random
import time

import psutil
import torch

from test_nodes_server import run_latent, sd3_graph

CONFIGS: dict[str, dict | None] = {
    "no_safedig": None,
    "disabled": {"enabled": False, "mode": "Both"},
    "off": {"mode": "Off"},
    "blend": {"mode": "Blend"},
    "repel": {"mode": "Repel", "repel_strength": 2.0},
    "both_soft": {"mode": "Both", "gate": "soft"},
    "blend_late": {"mode": "Blend", "start_percent": 0.5},
}


def server_rss_mb(server) -> float:
    """Resident memory of the ComfyUI process (the launcher's main.py child, or the process itself)."""
    proc = psutil.Process(server.proc.pid)
    procs = [proc, *proc.children(recursive=True)]
    main = [p for p in procs if any("main.py" in part for part in p.cmdline())]
    return max(p.memory_info().rss for p in (main or procs)) / 2**20


def run_load(server, runs: int, seed: int = 0, log=print) -> dict:
    twins = {name: run_latent(server, sd3_graph(f"twin_{name}", cfg, nonce=1))[0] for name, cfg in CONFIGS.items()}
    rng = random.Random(seed)
    rss, hook_counts, mismatches, times = [], [], [], []
    for i in range(runs):
        name = rng.choice(list(CONFIGS))
        t0 = time.perf_counter()
        latent, hooks, _ = run_latent(server, sd3_graph(f"load_{i}", CONFIGS[name], nonce=2 + i))
        times.append(time.perf_counter() - t0)
        if not torch.equal(latent, twins[name]):
            mismatches.append((i, name))
        hook_counts.append(hooks["safedig_hooks"] + hooks["forward_hooks"] + hooks["forward_pre_hooks"])
        rss.append(server_rss_mb(server))
        if (i + 1) % 20 == 0:
            log(f"{i + 1}/{runs} runs, RSS {rss[-1]:.0f} MB, mismatches {len(mismatches)}")
    warm = max(1, runs // 10)  # the first runs fill caches (kernels, allocator pools): growth counts after
    return {
        "runs": runs,
        "configs": sorted(CONFIGS),
        "mismatches": mismatches,
        "max_hooks_after_a_run": max(hook_counts),
        "rss_mb_after_warmup": round(rss[warm - 1], 1),
        "rss_mb_end": round(rss[-1], 1),
        "rss_growth_mb": round(rss[-1] - rss[warm - 1], 1),
        "rss_max_mb": round(max(rss), 1),
        "median_run_s": round(sorted(times)[len(times) // 2], 3),
    }
