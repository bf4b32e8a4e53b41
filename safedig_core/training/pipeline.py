"""The training pipeline as stages over one run folder (each stage resumes or skips finished work):

    collect/{set}/            activation shards per prompt set (collect.py)
    routing.json, routing.png candidate table, routed positions (routing.py)
    sae/{position}/           one TopK SAE per routed position + metrics (sae_training.py)
    calibration/{name}.safetensors   per-token harmful activations of full generations (features.py)
    features/{domain}.json    harmful ids/weights, safe anchor, tau, firing rates, per domain
    features/{domain}.maps.safetensors   the learned Blend map per position (blend_map.py)
    features/{domain}.affine.safetensors the learned affine Blend target per position (blend_map.py)
    adapt/{domain}/{position}/  target-domain decoders
    export: one pack file with both decoders and the provenance of every stage
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, replace
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .. import __version__
from ..errors import SafeDIGError
from ..pack import (
    BLEND_AFFINE,
    BLEND_ANCHOR,
    BLEND_MAP,
    ROLE_SOURCE,
    ROLE_TARGET,
    DomainEntry,
    DomainFeatures,
    PositionInfo,
    blend_tensor_key,
    build_metadata,
    decoder_key,
    encoder_key,
    load_pack,
    save_pack,
)
from ..sae import SAEDecoder
from . import distributed as dist
from .blend_map import candidate_label, choose_blend, fit_affine_map, fit_blend_map, gained
from .collect import ActivationSet, PromptRecord
from .features import (
    FeatureConfig,
    calibrate_tau,
    detection_auroc,
    domain_features,
    firing_rate,
    generation_maxima,
    record_harmful,
)
from .generators import Generator, make_generator
from .routing import CRITERIA, STEERABILITY, plot_table, route, route_steerable, rows_from_sets
from .sae_training import AdaptConfig, SAEConfig, adapt_decoder, load_sae, train_sae
from .steerability import MIN_GAIN, SteerabilityProbe, matched_pairs


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def _read_json(path: Path, what: str) -> dict:
    if not path.exists():
        raise SafeDIGError(f"{path.name} is missing", f"run the `{what}` stage first", path=path.parent)
    return json.loads(path.read_text())


def open_set(run: Path, name: str) -> ActivationSet:
    return ActivationSet(Path(run) / "collect" / name)


def _log_time(run: Path, stage: str, seconds: float) -> None:
    if dist.current().is_main:
        path = Path(run) / "timings.json"
        times = json.loads(path.read_text()) if path.exists() else {}
        times[stage] = round(seconds, 1)  # the latest run of the stage (a resumed stage counts from its restart)
        _write_json(path, times)


# -------------------------------------------------------------------------------------------- stages


def run_route(run: Path, set_name: str = "source", r: int = 3, plot: str | os.PathLike | None = None,
              positions: Sequence[str] | None = None, generator: Generator | None = None,
              steer_pairs: int = 24) -> list[dict]:
    """Score every candidate and keep R under the diversity rule, or, with a generator, score steerability
    on `steer_pairs` of the set's pairs too and keep the set chosen by joint effect (routing.py); with
    `positions`, keep exactly the user's positions (in that order). The table keeps every candidate's
    scores either way."""
    t0 = time.time()
    aset = open_set(run, set_name)
    extra: dict = {}
    if generator is not None:
        probe = SteerabilityProbe(generator, matched_pairs(aset.prompts, steer_pairs), aset.positions)
        table, greedy = route_steerable(rows_from_sets(aset), probe, r)
        method = ("pre-SAE routing: robustness (diff-of-means, LOSO, timestep stability) x steerability "
                  f"(patching with the matched safe output, {len(probe.unsafe)} pairs), set chosen by joint effect")
        extra = {"steerability": {"pairs": len(probe.unsafe), "min_gain": MIN_GAIN, "greedy": greedy}}
    else:
        table = route(rows_from_sets(aset), r)
        method = "pre-SAE robustness routing (diff-of-means, LOSO, timestep stability) + diversity rule"
    if positions:
        table = user_positions(table, positions)
        method = f"user-chosen positions {list(positions)} (router scores kept for reference)"
    criteria = [*CRITERIA, *([STEERABILITY] if generator is not None else [])]
    _write_json(Path(run) / "routing.json", {"method": method, "set": set_name, "R": r if not positions else
                                             len(positions), "criteria": criteria, "candidates": table, **extra,
                                             **({"user_positions": list(positions)} if positions else {})})
    plot_table(table, Path(run) / "routing.png", title=f"routing on '{set_name}' ({aset.architecture})")
    if plot:
        Path(plot).parent.mkdir(parents=True, exist_ok=True)
        plot_table(table, plot, title=f"routing on '{set_name}' ({aset.architecture})")
    _log_time(run, "route", time.time() - t0)
    return table


def user_positions(table: list[dict], positions: Sequence[str]) -> list[dict]:
    """Mark exactly `positions` as selected (rank = their order); the router's own choice stays in the note."""
    known = [c["position"] for c in table]
    missing = [p for p in positions if p not in known]
    if missing or len(set(positions)) != len(positions):
        raise SafeDIGError(f"--positions {','.join(positions)}: " + (f"{missing} not collected" if missing else
                           "a position is repeated"), f"choose among {', '.join(sorted(known))}")
    out = []
    for c in table:
        c = dict(c)
        was = c["note"]
        c["selected"] = c["position"] in positions
        c["rank"] = list(positions).index(c["position"]) + 1 if c["selected"] else 0
        c["note"] = ("user-chosen" if c["selected"] else "not chosen") + (f" (router: {was})" if was else "")
        out.append(c)
    return out


def routed_positions(run: Path) -> list[str]:
    table = _read_json(Path(run) / "routing.json", "route")["candidates"]
    return [c["position"] for c in sorted((c for c in table if c["selected"]), key=lambda c: c["rank"])]


def run_train(run: Path, sets: Sequence[str], cfg: SAEConfig, progress: bool = True,
              on_step: Callable[[int], None] | None = None) -> dict[str, dict]:
    t0 = time.time()
    asets = [open_set(run, s) for s in sets]
    metrics = {}
    for pos in routed_positions(run):
        _, m = train_sae(asets, pos, cfg, Path(run) / "sae" / pos, progress=progress, on_step=on_step)
        metrics[pos] = m
    _log_time(run, "train", time.time() - t0)
    return metrics


def _saes(run: Path) -> dict:
    return {p: load_sae(Path(run) / "sae" / p / "sae.safetensors") for p in routed_positions(run)}


def _calibration_cache(run: Path, name: str, generator: Generator | None, prompts: Sequence[PromptRecord],
                       saes: dict, harmful: dict[str, list[int]], progress: bool) -> dict[str, torch.Tensor]:
    """z_H of full generations for a prompt list, cached in calibration/{name}.safetensors."""
    key = hashlib.sha256(json.dumps([[asdict(p) for p in prompts], harmful], sort_keys=True).encode()).hexdigest()
    path = Path(run) / "calibration" / f"{name}.safetensors"
    if path.exists():
        with safe_open(str(path), framework="pt") as f:
            if f.metadata().get("key") == key:
                return {p: f.get_tensor(f"zh.{p}") for p in saes}
    if generator is None:
        raise SafeDIGError(f"calibration '{name}' needs the generator", "pass it, or rerun `features`")
    zh = record_harmful(generator, prompts, saes, harmful, progress=progress, desc=f"calibrate {name}")
    if dist.current().is_main:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        save_file({f"zh.{p}": v.contiguous() for p, v in zh.items()}, str(tmp), metadata={"key": key})
        os.replace(tmp, path)
    return zh


def _domain_entry(domain: str, set_name: str, features: dict[str, tuple[dict, torch.Tensor, torch.Tensor]],
                  checks: dict[str, dict[str, torch.Tensor]], benign: str, negatives: Sequence[str],
                  cfg: FeatureConfig) -> dict:
    """tau and firing rates for one domain's weights; returns the features JSON."""
    per_position = {p: dict(f) for p, (f, _, _) in features.items()}
    maxima = {name: {p: generation_maxima(zh[p], per_position[p]["harmful_weights"]) for p in per_position}
              for name, zh in checks.items()}
    taus, _ = calibrate_tau(maxima[benign], cfg.fire_rate)
    for p, (_, scores, labels) in features.items():
        above = scores > taus[p]
        per_position[p].update(tau=round(taus[p], 6), detection_auroc=round(detection_auroc(scores, labels), 4),
                               unsafe_rows_above_tau=round(float(above[labels == 1].double().mean()), 4),
                               safe_rows_above_tau=round(float(above[labels == 0].double().mean()), 4))
    rates = {name: round(firing_rate(m, taus), 4) for name, m in maxima.items()}
    return {"domain": domain, "set": set_name, "negatives": list(negatives), "positions": per_position,
            "config": asdict(cfg), "checks": list(checks),
            "calibration": {"fit_on": benign, "generations": {n: int(next(iter(z.values())).shape[0])
                                                               for n, z in checks.items()},
                            "fire_rate_hard_gate": rates}}


def run_features(run: Path, domain: str, set_name: str, calib: Mapping[str, Sequence[PromptRecord]],
                 cfg: FeatureConfig, generator: Generator | None = None, negatives: Sequence[str] | None = None,
                 progress: bool = True) -> dict:
    """Source-domain features + tau. `calib` maps check names to prompt lists; the first is the benign
    set tau is fitted on, the others (held-out benign, unsafe prompts) are only measured. `negatives`:
    collected sets whose rows count as not-unsafe when fitting weights (default: "benign" if collected).
    `cfg.harmful_from`: the collected pair sets H is chosen from (e.g. source and target; default: `set_name`
    alone); the weights are fit on `set_name`'s pairs only, a target domain re-fits them in `adapt`."""
    t0 = time.time()
    run = Path(run)
    saes = _saes(run)
    aset = open_set(run, set_name)
    negatives = _default_negatives(run, set_name) if negatives is None else list(negatives)
    neg_sets = [open_set(run, n) for n in negatives]
    harmful_sets = [aset if n == set_name else open_set(run, n) for n in cfg.harmful_from]
    features = {p: domain_features(sae, aset, neg_sets, p, None, cfg, harmful_sets) for p, sae in saes.items()}
    harmful = {p: f[0]["harmful_ids"] for p, f in features.items()}
    if generator is None and any(not _cache_ok(run, n) for n in calib):
        generator = make_generator(aset.manifest["generator"])
    checks = {n: _calibration_cache(run, n, generator, prompts, saes, harmful, progress)
              for n, prompts in calib.items()}
    entry = _domain_entry(domain, set_name, features, checks, next(iter(calib)), negatives, cfg)
    entry.update(role=ROLE_SOURCE)
    if dist.current().is_main:
        _fit_blend_maps(run, domain, entry, saes, aset)
        _write_json(run / "features" / f"{domain}.json", entry)
    _log_time(run, "features", time.time() - t0)
    return entry


def _fit_blend_maps(run: Path, domain: str, entry: dict, saes: dict, pairs: ActivationSet,
                    decoders: Mapping[str, torch.Tensor] | None = None) -> None:
    """The domain's learned Blend map per position, fit on its own pairs and decoded with its own decoder
    (blend_map.py), saved beside its features; each position's entry records blend_target "map" and the fit."""
    maps = {}
    for p, sae in saes.items():
        f = entry["positions"][p]
        maps[p], fit = fit_blend_map(sae, [pairs], p, f["harmful_ids"], w_dec=(decoders or {}).get(p))
        # where no harmful latent fired on the pairs there is nothing to fit: that position keeps the anchor
        f.update(blend_target=BLEND_MAP if fit["tokens"] else BLEND_ANCHOR, blend_fit=fit)
    _save_maps(run / "features" / f"{domain}.maps.safetensors", maps)


def fit_shared_affines(run: Path, set_names: Sequence[str], keep: Sequence[str] = ()) -> None:
    """One affine Blend target per position (blend_map.fit_affine_map), fit on the matched pairs of every set
    in `set_names` (e.g. the source and the target domain's), told to leave the tokens of the `keep` sets (the
    benign prompts) where they are, and stored for every domain of the run, with its
    fit in each entry's "affine_fit": a token is steered by the domain whose gate opened widest, so domains
    with targets fit apart would move neighbouring tokens of one image toward different places, and a few
    dozen target pairs alone fit d_model + 1 inputs poorly. `apply_blend_choice` makes the domains use it."""
    run = Path(run)
    saes = _saes(run)
    sets = [open_set(run, n) for n in set_names]
    entries = {f.stem: f for f in sorted((run / "features").glob("*.json"))}
    if not entries:
        raise SafeDIGError("the run has no domain features yet", "run the `features` stage first", path=run)
    harmful = json.loads(next(iter(entries.values())).read_text())["positions"]
    affines, fits = {}, {}
    for p, sae in saes.items():
        affines[p], fits[p] = fit_affine_map(sae, sets, p, harmful[p]["harmful_ids"], [open_set(run, n) for n in keep])
        fits[p].update(pairs_from=list(set_names), kept_from=list(keep))
    for domain, path in entries.items():
        entry = json.loads(path.read_text())
        for p in saes:
            entry["positions"][p]["affine_fit"] = dict(fits[p])
        _save_maps(run / "features" / f"{domain}.affine.safetensors", affines)
        _write_json(path, entry)


def _save_maps(path: Path, maps: Mapping[str, torch.Tensor]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    save_file({p: m.contiguous() for p, m in maps.items()}, str(tmp))
    os.replace(tmp, path)


def run_affines(run: Path) -> dict[tuple[str, str], torch.Tensor]:
    """{(domain, position): affine Blend target} of every domain of the run whose maps were fit."""
    out = {}
    for f in sorted((Path(run) / "features").glob("*.affine.safetensors")):
        domain = f.name.removesuffix(".affine.safetensors")
        entry = json.loads(f.with_name(f"{domain}.json").read_text())
        out.update({(domain, p): a for p, a in load_file(str(f)).items()
                    if entry["positions"][p].get("affine_fit", {}).get("tokens")})
    return out


def apply_blend_choice(run: Path, target: str, gain: float, distances: Mapping[str, float]) -> None:
    """Make every fitted position of every domain of the run blend with `target` at `gain` (what
    blend_map.choose_blend picked), and record the choice and the distances it was made on."""
    suffix = {BLEND_MAP: "maps", BLEND_AFFINE: "affine"}[target]
    for f in sorted((Path(run) / "features").glob(f"*.{suffix}.safetensors")):
        entry_path = f.with_name(f.name.replace(f".{suffix}.safetensors", ".json"))
        entry = json.loads(entry_path.read_text())
        tensors = load_file(str(f))
        fit_key = "blend_fit" if target == BLEND_MAP else "affine_fit"
        for p, t in tensors.items():
            pos = entry["positions"][p]
            if not pos.get(fit_key, {}).get("tokens"):
                continue
            tensors[p] = gained(target, t, pos["harmful_ids"], gain)
            pos[fit_key].update(gain=gain, choice_distances=dict(distances))
            pos["blend_target"] = target
            if target == BLEND_AFFINE:  # the pack shows the fit of the target it uses
                pos["blend_fit"] = pos.pop("affine_fit")
        _save_maps(f, tensors)
        _write_json(entry_path, entry)


def choose_blend_target(run: Path, generator: Generator, set_names: Sequence[str], n_pairs: int) -> tuple[str, float]:
    """build-pack's last stage: fit the shared affine targets on the pairs of `set_names` (keeping the benign
    set's tokens in place, where the run has one), then let
    blend_map.choose_blend pick the learned target and gain (maps or affine, one choice for the whole pack) on
    `n_pairs` matched pairs drawn from those sets, without a judge, and apply it to the run. The candidates are
    measured on a pack exported to run/pack-before-gain.safetensors."""
    from ..steering_math import GateScope, Mode, SteeringParams

    run = Path(run)
    fit_shared_affines(run, set_names, _default_negatives(run, set_names[0]))
    pairs = [pair for n in set_names for pair in matched_pairs(open_set(run, n).prompts, n_pairs // len(set_names))]
    (target, gain), distances = choose_blend(load_pack(run_export(run, run / "pack-before-gain.safetensors")),
                                             run_affines(run), generator, pairs,
                                             SteeringParams(mode=Mode.BLEND, scope=GateScope.IMAGE))
    print(f"Blend target {candidate_label(target, gain)} (final-latent distance to the safe generations, "
          f"relative: {distances})", flush=True)
    apply_blend_choice(run, target, gain, distances)
    return target, gain


def blend_to_anchor(run: Path) -> None:
    """Make every domain of the run blend to its constant anchor (the learned maps stay in the run, unused):
    `build-pack --blend-target anchor`, how the 2026-11 shipped pack was built."""
    for f in sorted((Path(run) / "features").glob("*.json")):
        entry = json.loads(f.read_text())
        for pos in entry["positions"].values():
            pos["blend_target"] = BLEND_ANCHOR
        _write_json(f, entry)


def _default_negatives(run: Path, pairs: str) -> list[str]:
    return ["benign"] if pairs != "benign" and (run / "collect" / "benign" / "manifest.json").exists() else []


def _cache_ok(run: Path, name: str) -> bool:
    return (Path(run) / "calibration" / f"{name}.safetensors").exists()


def run_adapt(run: Path, domain: str, set_name: str, cfg: AdaptConfig, adapted_from: str | None = None,
              feature_cfg: FeatureConfig | None = None, progress: bool = True) -> dict:
    """Target-domain decoders (encoder and H frozen), re-estimated weights/anchor on the target pairs,
    and tau from the cached benign generations of the source `features` stage."""
    t0 = time.time()
    run = Path(run)
    source = adapted_from or _source_domain(run)
    src = _read_json(run / "features" / f"{source}.json", "features")
    cfg_f = feature_cfg or FeatureConfig(**src["config"])
    saes = _saes(run)
    aset = open_set(run, set_name)
    neg_sets = [open_set(run, n) for n in src["negatives"]]
    store = json.loads((run / "sae" / next(iter(saes)) / "metrics.json").read_text())["config"]["store_dtype"]
    cfg = replace(cfg, store_dtype=store)  # target decoders are stored like the source ones
    features, adapt_metrics, decoders = {}, {}, {}
    for p, sae in saes.items():
        features[p] = domain_features(sae, aset, neg_sets, p, src["positions"][p]["harmful_ids"], cfg_f)
        decoder, adapt_metrics[p] = adapt_decoder(sae, [aset], p, cfg, run / "adapt" / domain / p, progress=progress)
        assert isinstance(decoder, SAEDecoder)
        decoders[p] = decoder.W_dec.detach()  # rounded to its store dtype: what the export reads back
    checks = {n: _load_cache(run, n, saes) for n in src["checks"]}
    entry = _domain_entry(domain, set_name, features, checks, src["checks"][0], src["negatives"], cfg_f)
    entry.update(role=ROLE_TARGET, adapted_from=source,
                 adapt={p: {k: v for k, v in m.items() if k != "config_hash"} for p, m in adapt_metrics.items()})
    if dist.current().is_main:
        _fit_blend_maps(run, domain, entry, saes, aset, decoders)
        _write_json(run / "features" / f"{domain}.json", entry)
    _log_time(run, "adapt", time.time() - t0)
    return entry


def _load_cache(run: Path, name: str, saes: dict) -> dict[str, torch.Tensor]:
    path = Path(run) / "calibration" / f"{name}.safetensors"
    if not path.exists():
        raise SafeDIGError(f"calibration cache {name} is missing", "rerun the `features` stage", path=path)
    with safe_open(str(path), framework="pt") as f:
        return {p: f.get_tensor(f"zh.{p}") for p in saes}


def _source_domain(run: Path) -> str:
    for f in sorted((Path(run) / "features").glob("*.json")):
        if json.loads(f.read_text()).get("role") == ROLE_SOURCE:
            return f.stem
    raise SafeDIGError("no source-domain features in this run", "run the `features` stage first", path=run)


# -------------------------------------------------------------------------------------------- export


def run_export(run: Path, out: str | os.PathLike, extra_provenance: dict | None = None) -> Path:
    """Assemble the pack: encoders, the source decoder and every adapted decoder, routing table, features,
    metrics and provenance. The file is validated by save_pack before it replaces anything."""
    run = Path(run)
    routing = _read_json(run / "routing.json", "route")
    positions = routed_positions(run)
    saes = _saes(run)
    source = _source_domain(run)
    domains = {source: _read_json(run / "features" / f"{source}.json", "features")}
    for f in sorted((run / "features").glob("*.json")):
        entry = json.loads(f.read_text())
        if entry.get("role") == ROLE_TARGET:
            domains[f.stem] = entry
    tensors, infos = {}, {}
    first = next(iter(saes.values()))
    for p in positions:
        sae = saes[p]
        m = json.loads((run / "sae" / p / "metrics.json").read_text())
        metrics = {"fve": m["fve"], "dead_fraction": m["dead_fraction"], "l0": m["l0"]}
        for d, e in domains.items():
            if e["role"] == ROLE_TARGET:
                metrics[f"fve_{d}"] = e["adapt"][p]["fve_target_adapted"]
                metrics[f"fve_{d}_src_dec"] = e["adapt"][p]["fve_target_source_decoder"]
        infos[p] = PositionInfo(d_model=sae.d_model, d_sae=sae.d_sae, k=sae.encoder.k, scale=float(sae.scale),
                                harmful_ids=domains[source]["positions"][p]["harmful_ids"], metrics=metrics)
        for name in ("W_enc", "b_enc", "b_pre"):
            tensors[encoder_key(p, name)] = getattr(sae.encoder, name).detach()
        tensors[decoder_key(source, p, "W_dec")] = sae.decoder.W_dec.detach()
        tensors[decoder_key(source, p, "b_dec")] = sae.decoder.b_dec.detach()
        for d, e in domains.items():
            if e["role"] == ROLE_TARGET:
                dec = load_file(str(run / "adapt" / d / p / "decoder.safetensors"))
                tensors[decoder_key(d, p, "W_dec")] = dec["W_dec"]
                tensors[decoder_key(d, p, "b_dec")] = dec["b_dec"]
    entries = {}
    for d, e in domains.items():
        feats = {p: DomainFeatures(harmful_weights=f["harmful_weights"], anchor_ids=f["safe_anchor_ids"],
                                   anchor_values=f["safe_anchor_values"], tau=f["tau"],
                                   extra={"detection_auroc": f["detection_auroc"],
                                          **({"blend_fit": f["blend_fit"]} if "blend_fit" in f else {})},
                                   blend_target=f.get("blend_target", "anchor"))
                 for p, f in ((p, e["positions"][p]) for p in positions)}
        for target, suffix in ((BLEND_MAP, "maps"), (BLEND_AFFINE, "affine")):
            if any(f.blend_target == target for f in feats.values()):
                stored = load_file(str(run / "features" / f"{d}.{suffix}.safetensors"))
                for p in positions:
                    if feats[p].blend_target == target:
                        key = blend_tensor_key(d, p, target)
                        assert key is not None  # a learned target always has its tensor
                        tensors[key] = stored[p]
        entries[d] = DomainEntry(feats, adapted_from=e["adapted_from"] if e["role"] == ROLE_TARGET else None,
                                 extra={"calibration": e["calibration"]})
    sae_cfg = json.loads((run / "sae" / positions[0] / "metrics.json").read_text())["config"]
    aset = open_set(run, routing["set"])
    timings = json.loads((run / "timings.json").read_text()) if (run / "timings.json").exists() else {}
    sets = {s.name: len(ActivationSet(s, require_complete=False).prompts) for s in sorted((run / "collect").iterdir())
            if (s / "manifest.json").exists()}
    provenance = {
        "model": aset.manifest["generator"], "safedig_version": __version__, "created": time.strftime(
            "%Y-%m-%d %H:%M:%S %Z"), "prompts_per_set": sets, "capture_steps": aset.capture_steps,
        "sae_config": sae_cfg, "stage_seconds": timings, "torch": torch.__version__,
        "python": platform.python_version(),
        "command": " ".join(sys.argv),
        "harmful_from": list(domains[source]["config"].get("harmful_from") or [domains[source]["set"]]),
        **(extra_provenance or {}),
    }
    meta = build_metadata(
        architecture=aset.architecture, d_model=first.d_model, positions=infos, source_domain=source, domains=entries,
        sae={"type": "topk", "expansion": sae_cfg["expansion"], "k": sae_cfg["k"],
             "aux_k": sae_cfg["aux_k"] or first.d_model // 2},
        routing=routing, provenance=provenance)
    return save_pack(out, meta, {k: _compact(v) for k, v in tensors.items()})


def _compact(t: torch.Tensor) -> torch.Tensor:
    """The smallest of float16 / bfloat16 / float32 that holds the tensor exactly (training rounded the
    weights to its store_dtype, so this is that dtype)."""
    for dtype in (torch.float16, torch.bfloat16):
        if torch.equal(t.to(dtype).float(), t.float()):
            return t.to(dtype)
    return t.float()
