"""Does the router's steerability score predict what the judge sees when a position is patched?

Reads a pack's routing table (steerability measured by build-pack on training-wording source pairs, no
judge) and benchmarks/results/patching.json (the judge's redrawn share and unsafe rate when the same
position is replaced by the matched safe prompt's output, on held-out wordings, both domains), and
reports, over every candidate position both cover, Spearman's rank correlation of each routing criterion
with the judged redrawn share and with the judged drop in unsafe rate, with a 95 % bootstrap interval
(resampling positions) and a one-sided permutation p-value.

    .venv/bin/python benchmarks/routing_steerability.py [--pack PACK]

PACK (default benchmarks/results/ablation_packs/router_choice.safetensors) is a pack `build-pack` routed
itself, e.g. `python -m safedig_core build-pack --out benchmarks/results/ablation_packs/router_choice.safetensors`.

Writes benchmarks/results/routing_steerability.json and .png.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from safedig_core import load_pack  # noqa: E402

CRITERIA = ("steerability", "robustness", "separability", "score")


def ranks(v: np.ndarray) -> np.ndarray:
    order = v.argsort(kind="stable")
    r = np.empty(len(v))
    r[order] = np.arange(len(v))
    for value in np.unique(v):  # ties share their mean rank
        r[v == value] = r[v == value].mean()
    return r


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = ranks(a), ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def correlation(a: np.ndarray, b: np.ndarray, rng: np.random.Generator, n: int = 5000) -> dict:
    rho = spearman(a, b)
    boot = [spearman(a[i], b[i]) for i in (rng.integers(0, len(a), len(a)) for _ in range(n))]
    boot = np.array([x for x in boot if np.isfinite(x)])
    perm = np.array([spearman(a, rng.permutation(b)) for _ in range(n)])
    return {"spearman": round(rho, 4), "ci95": [round(float(np.quantile(boot, q)), 4) for q in (0.025, 0.975)],
            "p_one_sided": round(float((perm >= rho).mean()), 4)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pack", default=str(ROOT / "benchmarks" / "results" / "ablation_packs" /
                                          "router_choice.safetensors"))
    ap.add_argument("--patching", default=str(ROOT / "benchmarks" / "results" / "patching.json"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "routing_steerability"))
    args = ap.parse_args()
    table = {c["position"]: c for c in load_pack(args.pack).metadata["routing"]["candidates"]}
    if not any("steerability" in c for c in table.values()):
        raise SystemExit("this pack's routing table has no steerability column: build it with build-pack")
    judged = json.loads(Path(args.patching).read_text())["rows"]
    none = judged["none"]
    positions = sorted(p for p in table if p in judged)
    redrawn = np.array([judged[p]["redrawn_mean"] for p in positions])
    drop = np.array([(none["source_unsafe_rate"] + none["target_unsafe_rate"]
                      - judged[p]["source_unsafe_rate"] - judged[p]["target_unsafe_rate"]) / 2 for p in positions])
    rng = np.random.default_rng(0)
    out: dict = {"positions": positions, "n_positions": len(positions),
                 "judged": {"redrawn": redrawn.round(4).tolist(), "unsafe_drop": drop.round(4).tolist()},
                 "criteria": {}}
    for name in CRITERIA:
        values = np.array([float(table[p][name]) if isinstance(table[p].get(name), (int, float)) else 0.0
                           for p in positions])
        out["criteria"][name] = {"values": values.round(4).tolist(),
                                 "vs_redrawn": correlation(values, redrawn, rng),
                                 "vs_unsafe_drop": correlation(values, drop, rng)}
        r = out["criteria"][name]
        print(f"{name:13s} rho vs redrawn {r['vs_redrawn']['spearman']:+.2f} {r['vs_redrawn']['ci95']}  "
              f"p {r['vs_redrawn']['p_one_sided']:.3f}   vs unsafe drop {r['vs_unsafe_drop']['spearman']:+.2f}")
    out["routed"] = [p for p, c in table.items() if c.get("selected")]
    path = Path(args.out)
    path.with_suffix(".json").write_text(json.dumps(out, indent=1) + "\n")
    plot(out, path.with_suffix(".png"))
    return 0


def plot(out: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 4), sharey=True)
    for ax, name in zip(axes, ("steerability", "robustness"), strict=True):
        c = out["criteria"][name]
        ax.scatter(c["values"], out["judged"]["redrawn"], s=25, zorder=3)
        for x, y, p in zip(c["values"], out["judged"]["redrawn"], out["positions"], strict=True):
            ax.annotate(p + (" *" if p in out["routed"] else ""), (x, y), fontsize=6, xytext=(3, 2),
                        textcoords="offset points")
        ax.set_xlabel(f"router's {name} (no judge)")
        low, high = c["vs_redrawn"]["ci95"]
        ax.set_title(f"Spearman {c['vs_redrawn']['spearman']:+.2f} [{low:+.2f}, {high:+.2f}]", fontsize=9)
        ax.set_xlim(-0.05, 1.05)
    axes[0].set_ylabel("judged redrawn share when patched (patching.py)")
    fig.suptitle("Routing criteria vs the judged patching effect, per candidate position (* = routed)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
