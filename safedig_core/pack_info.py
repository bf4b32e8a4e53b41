"""Human-readable views of packs (the `inspect` subcommand)."""

from __future__ import annotations

from collections.abc import Sequence

from .pack import (
    K_ADAPTED_FROM,
    K_CANDIDATES,
    K_DOMAINS,
    K_PROVENANCE,
    K_ROLE,
    K_ROUTING,
    K_SAE,
    K_SCORE,
    DictionaryPack,
)


def _table(rows: Sequence[Sequence[object]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def _num(x) -> str:
    return f"{x:.3f}" if isinstance(x, float) else str(x)


def _blend(pack: DictionaryPack, domain: str, position: str) -> str:
    """'anchor', or the learned target ('map', 'affine') with its fit (gain, R^2) where the pack records one."""
    f = pack.domain_features(domain, position)
    fit = f.extra.get("blend_fit") or {}
    details = ",".join(f"{k}={_num(fit[k])}" for k in ("gain", "decoded_r2", "r2") if k in fit)
    return f.blend_target + (f"({details})" if details else "")


def format_pack(pack: DictionaryPack) -> str:
    m = pack.metadata
    out = [
        f"SafeDIG pack {pack.path}",
        f"  architecture {pack.architecture}, d_model {pack.d_model}, SAE {m[K_SAE]}",
        f"  source domain {pack.source_domain}; domains: " + ", ".join(
            f"{d} ({e[K_ROLE]}" + (f", adapted from {e[K_ADAPTED_FROM]})" if K_ADAPTED_FROM in e else ")")
            for d, e in m[K_DOMAINS].items()),
        "",
        "Routed positions:",
    ]
    rows = []
    for pos in pack.positions:
        info = pack.position_info(pos)
        taus = " ".join(f"{d}={pack.domain_features(d, pos).tau:.3g}" for d in pack.domains)
        blends = " ".join(f"{d}={_blend(pack, d, pos)}" for d in pack.domains)
        metrics = " ".join(f"{k}={_num(v)}" for k, v in sorted(info.metrics.items()))
        if not info.detects:
            taus += " (never opens: steers what another position detects)"
        if not info.edits:
            blends = "none (detects only)"
        rows.append([pos, info.use, info.d_sae, info.k, f"{info.scale:.4g}", len(info.harmful_ids), taus, blends,
                     metrics])
    out.append(_table(rows, ["position", "use", "d_sae", "k", "scale", "|H|", "tau", "blend target", "metrics"]))
    candidates = m[K_ROUTING][K_CANDIDATES]
    if candidates:
        keys = sorted({k for c in candidates for k in c} - {"position"})
        out += ["", f"Routing table ({len(candidates)} candidates, routing {m[K_ROUTING].get('method', '?')}):"]
        ranked = sorted(candidates, key=lambda c: -c[K_SCORE])
        out.append(_table([[c["position"], *(_num(c.get(k)) for k in keys)] for c in ranked], ["position", *keys]))
    out += ["", "Provenance:"] + [f"  {k}: {v}" for k, v in sorted(m[K_PROVENANCE].items())]
    return "\n".join(out)
