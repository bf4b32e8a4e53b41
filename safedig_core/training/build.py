"""Build a pack from prompt sets, or add an adapted domain to a pack, in one call on any `Generator`: the
pipeline the Build / Adapt Dictionary nodes run (the CLI runs the same stages one by one, pipeline.py).

    plan = estimate(generator, settings, n_collect, n_calibrate)  storage, memory, time, before sampling
    plan.check(work)                                   refuses a plan that cannot fit, naming what to lower
    build_pack(generator, pairs, benign, ...)          collect -> route -> SAEs -> features + tau -> export
    adapt_pack(pack, generator, pairs, benign, ...)    frozen encoders, adapted decoders, new features + tau

Every stage resumes from the work folder (finished shards, SAE checkpoints, calibration caches), so an
interrupted build rerun with the same settings continues where it stopped. The pack is written atomically
(pack.save_pack) and never overwrites an existing file unless asked to.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from .. import __version__
from ..errors import SafeDIGError
from ..pack import BLEND_ANCHOR, BLEND_MAP, DictionaryPack, DomainEntry, DomainFeatures, load_pack, with_domain
from ..positions import ModelPositions, resolve
from ..sae import SAEDecoder, TopKSAE
from .blend_map import GAINS, fit_blend_map
from .collect import ActivationSet, PromptRecord, collect, evenly_spaced_steps, is_heldout
from .features import FeatureConfig, domain_features
from .generators import Generator
from .pipeline import (
    _calibration_cache,
    _domain_entry,
    choose_blend_target,
    run_adapt,
    run_export,
    run_features,
    run_route,
    run_train,
)
from .sae_training import AdaptConfig, SAEConfig, adapt_decoder

PAIRS_SET, TARGET_SET, BENIGN_SET = "source", "target", "benign"
BUFFER_TOKENS = SAEConfig.buffer_tokens  # the shuffle buffer of SAE training


@dataclass(frozen=True)
class BuildSettings:
    """What a user tunes (node inputs / CLI flags). positions: candidate ids, () = every position."""

    capture_steps: int = 4
    positions: tuple[str, ...] = ()
    routed: int = 3
    expansion: int = 16
    k: int = 32
    epochs: float = 3.0
    max_tokens: int = 0
    seed: int = 0
    fire_rate: float = 0.01
    shard_size: int = 16
    choice_pairs: int = 16  # matched pairs the learned Blend target is chosen on (0: keep the maps, no choice)

    def __post_init__(self) -> None:
        checks = [("capture_steps", self.capture_steps >= 1), ("routed", self.routed >= 1),
                  ("expansion", self.expansion >= 1), ("k", self.k >= 1), ("epochs", self.epochs > 0),
                  ("max_tokens", self.max_tokens >= 0), ("shard_size", self.shard_size >= 1),
                  ("fire_rate", 0 < self.fire_rate < 1), ("choice_pairs", self.choice_pairs >= 0)]
        bad = [name for name, ok in checks if not ok]
        if bad:
            raise SafeDIGError(f"build settings out of range: {', '.join(f'{b}={getattr(self, b)}' for b in bad)}",
                               "use capture_steps, routed, expansion, k, shard_size >= 1, epochs > 0, "
                               "max_tokens >= 0 (0 = all), 0 < fire_rate < 1, choice_pairs >= 0")


class Reporter:
    """Progress of a long build: one bar per stage. The default prints a line per stage; the nodes drive
    ComfyUI's progress bar and check the interrupt button in `advance`."""

    def stage(self, name: str, total: int) -> None:
        print(f"SafeDIG build: {name} ({total})", flush=True)

    def advance(self, n: int = 1) -> None:
        pass

    def check(self) -> None:
        """Called often during long work: raise here to stop cleanly (finished shards and checkpoints stay)."""


# ------------------------------------------------------------------------------------------ plan


@dataclass
class BuildPlan:
    """Estimated cost of a build; `lines()` is what the console shows, `check()` refuses what cannot fit."""

    generations: int
    disk_bytes: int
    ram_bytes: int
    seconds: float
    detail: dict = field(default_factory=dict)

    def lines(self) -> list[str]:
        d = self.detail
        return [f"SafeDIG build plan: {self.generations} generations x {d['steps']} steps "
                f"({d['calls_per_step']} model call(s) per step), {d['positions']} candidate positions, "
                f"{d['tokens_per_row']} tokens kept per row, width {d['d_model']}",
                f"  activation storage {_gb(self.disk_bytes)}, peak memory {_gb(self.ram_bytes)}, "
                f"time about {self.seconds / 60:.0f} min (sampling {d['sampling_seconds'] / 60:.0f} min at "
                f"{d['seconds_per_generation']:.1f} s per generation, SAE training {d['train_seconds'] / 60:.0f} min)"]

    def check(self, work: Path, free_ram: int | None = None) -> None:
        work.mkdir(parents=True, exist_ok=True)
        free_disk = shutil.disk_usage(work).free
        if self.disk_bytes * 1.1 > free_disk:
            raise SafeDIGError(f"the build needs about {_gb(self.disk_bytes)} of activation storage but "
                               f"{work} has {_gb(free_disk)} free",
                               "lower max_tokens_per_row, capture_steps or the candidate positions, use fewer "
                               "prompts, or free disk space", path=work)
        free_ram = available_memory() if free_ram is None else free_ram
        if self.ram_bytes > free_ram:
            raise SafeDIGError(f"the build needs about {_gb(self.ram_bytes)} of memory at its peak but "
                               f"{_gb(free_ram)} is available",
                               "lower max_tokens_per_row or the candidate positions (collection), or the SAE "
                               "expansion (training)")


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def available_memory() -> int:
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:  # pragma: no cover - ComfyUI always installs psutil
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def position_tokens(position: str, image_tokens: int, text_tokens: int) -> int:
    """Tokens an activation at `position` holds: the pooled vector 1, text or image stream, or both."""
    if position == "input.vec":
        return 1
    if position == "input.txt" or ".txt." in position:
        return text_tokens
    if ".img." in position:
        return image_tokens
    return image_tokens + text_tokens


def estimate(generator: Generator, settings: BuildSettings, n_collect: int, n_calibrate: int,
             seconds_per_generation: float | None = None) -> BuildPlan:
    """The plan of a build on this generator's model: its width, token counts and positions, and a
    sampling time measured on it (`generator.time_generation()`) unless given."""
    mp = resolve(generator.model)
    positions = candidate_positions(mp, settings.positions)
    image_tokens, text_tokens = generator.token_counts()
    per_gen = generator.time_generation() if seconds_per_generation is None else seconds_per_generation
    return plan_costs(d_model=mp.d_model, positions=positions, image_tokens=image_tokens, text_tokens=text_tokens,
                      steps=generator.steps, calls_per_step=generator.calls_per_step, settings=settings,
                      n_collect=n_collect, n_calibrate=n_calibrate, seconds_per_generation=per_gen,
                      train_flops_per_second=matmul_flops_per_second())


def plan_costs(*, d_model: int, positions: Sequence[str], image_tokens: int, text_tokens: int, steps: int,
               calls_per_step: int, settings: BuildSettings, n_collect: int, n_calibrate: int,
               seconds_per_generation: float, train_flops_per_second: float) -> BuildPlan:
    """Storage, peak memory and time of a build, from figures alone (so docs can plan for models not at
    hand: `python -m safedig_core plan flux-dev`). Storage: float16 tokens kept per row and position plus a
    float32 mean; memory: the larger of one shard being written and SAE training (shuffle buffer, weights,
    gradients, Adam); time: sampling plus 6 x 2 x d_sae x d_model flops per training token and epoch."""
    captured = min(settings.capture_steps, steps)
    kept = {p: min(position_tokens(p, image_tokens, text_tokens), settings.max_tokens or 10**9) for p in positions}
    row_bytes = sum(kept.values()) * d_model * 2 + len(positions) * d_model * 4
    disk = n_collect * captured * row_bytes
    shard_ram = min(settings.shard_size, n_collect) * captured * row_bytes * 3  # + a float32 copy while writing
    d_sae = settings.expansion * d_model
    train_tokens = n_collect * captured * max(kept.values())
    buffer = min(BUFFER_TOKENS, train_tokens) * d_model * 4 * 2
    sae_ram = d_sae * d_model * 4 * 2 * 4  # encoder + decoder, their gradients and Adam's two moments
    routed = min(settings.routed, len(positions))
    train_s = 6 * 2 * d_sae * d_model * train_tokens * settings.epochs * routed / train_flops_per_second
    generations = n_collect + n_calibrate
    return BuildPlan(generations, int(disk), int(max(shard_ram, buffer + sae_ram)),
                     seconds_per_generation * generations + train_s, {
                         "steps": steps, "calls_per_step": calls_per_step, "positions": len(positions),
                         "tokens_per_row": max(kept.values()), "d_model": d_model,
                         "seconds_per_generation": seconds_per_generation,
                         "sampling_seconds": seconds_per_generation * generations, "train_seconds": train_s})


def matmul_flops_per_second(size: int = 512, repeats: int = 8) -> float:
    """This machine's float32 matmul rate on the CPU (SAE training runs there), measured in ~0.1 s."""
    a = torch.randn(size, size)
    a @ a
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ a
    return 2 * size**3 * repeats / max(time.perf_counter() - t0, 1e-9)


def candidate_positions(mp: ModelPositions, wanted: Sequence[str]) -> list[str]:
    """The user's candidate ids, checked against the model, or every position when none are given."""
    unknown = [p for p in wanted if p not in mp.modules]
    if unknown:
        raise SafeDIGError(f"candidate positions {unknown} do not exist in {mp.describe()}",
                           f"leave the list empty for every position, or choose among {', '.join(mp.ids)}")
    return list(wanted) or mp.ids


# ------------------------------------------------------------------------------------------ prompts


def check_pairs(records: Sequence[PromptRecord], what: str = "prompt pairs") -> None:
    """Matched pairs: every pair id once unsafe and once safe; at least two pairs. Raises before sampling."""
    by_pair: dict[int, list[int]] = {}
    for r in records:
        if r.pair < 0:
            raise SafeDIGError(f"{what}: {r.text[:60]!r} has no pair id", 'give each line "pair": N, shared by '
                               "the unsafe prompt and its safe counterpart")
        by_pair.setdefault(r.pair, []).append(r.label)
    bad = [p for p, labels in by_pair.items() if sorted(labels) != [0, 1]]
    if bad:
        raise SafeDIGError(f"{what}: pair(s) {bad[:5]} do not hold exactly one unsafe and one safe prompt",
                           "write each pair as two lines with the same \"pair\": one unsafe, one safe")
    if len(by_pair) < 2:
        raise SafeDIGError(f"{what}: {len(by_pair)} pair(s); SAE features need several", "add more matched pairs")


def check_benign(records: Sequence[PromptRecord]) -> None:
    if not records or any(r.label for r in records):
        raise SafeDIGError("benign prompts: the set is empty or holds unsafe prompts",
                           'use a benign set: one {"text": ..., "label": "benign"} per line')


def work_folder(root: Path, name: str, *parts) -> Path:
    """A work folder per (pack name, everything that changes the result): the same settings resume, other
    settings start fresh beside it."""
    key = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return Path(root) / f"{Path(name).stem}-{key}"


def refuse_overwrite(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        raise SafeDIGError(f"{out.name} already exists", "choose another pack name, or turn on overwrite",
                           path=out.parent)


# ------------------------------------------------------------------------------------------ build


def _with_autograd(fn):
    """SAE training and the weight fit need autograd, even when the caller runs under torch.inference_mode
    (ComfyUI runs every node inside it; a tensor made there could never be trained). Sampling inside
    stays in inference mode where the generator puts it (nodes/build_sampling.py)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with torch.inference_mode(False), torch.enable_grad():
            return fn(*args, **kwargs)
    return wrapper




@dataclass(frozen=True)
class TargetPairs:
    """A second risk domain built in the same run (as `build-pack` does): its pairs also choose the
    harmful latents H, and its decoders are adapted to it before the pack is written."""

    domain: str
    pairs: Sequence[PromptRecord]
    epochs: float = 3.0
    pull: float = AdaptConfig.pull


@_with_autograd
def build_pack(generator: Generator, pairs: Sequence[PromptRecord], benign: Sequence[PromptRecord], out: Path,
               work: Path, settings: BuildSettings, *, domain: str = "source", target: TargetPairs | None = None,
               calibration: Sequence[PromptRecord] | None = None, reporter: Reporter | None = None,
               overwrite: bool = False, plan_seconds: float | None = None, provenance: dict | None = None) -> Path:
    """The whole pipeline on one model: pairs + benign -> a pack with one source domain at `out` (plus an
    adapted `target` domain when given). tau is fit on full generations of `calibration` (default: the
    benign prompts, which are also SAE training data and the weights' negatives)."""
    reporter = reporter or Reporter()
    out = Path(out)
    check_pairs(pairs)
    check_benign(benign)
    calibration = list(benign if calibration is None else calibration)
    check_benign(calibration)
    if target is not None:
        check_pairs(target.pairs, "target prompt pairs")
    refuse_overwrite(out, overwrite)
    sets = {PAIRS_SET: pairs, **({TARGET_SET: target.pairs} if target else {}), BENIGN_SET: benign}
    checks = {"unsafe_heldout": _unsafe_checks(pairs),
              **({"unsafe_target_heldout": _unsafe_checks(target.pairs)} if target else {})}
    plan = estimate(generator, settings, sum(len(v) for v in sets.values()),
                    len(calibration) + sum(len(v) for v in checks.values()) + choice_generations(settings),
                    plan_seconds)
    for line in plan.lines():
        print(line, flush=True)
    plan.check(work)
    t0 = time.time()
    positions = candidate_positions(resolve(generator.model), settings.positions)
    _collect_sets(generator, sets, work, settings, reporter, positions)
    reporter.stage("route", 1)
    run_route(work, PAIRS_SET, settings.routed)
    reporter.advance()
    d_model = ActivationSet(work / "collect" / PAIRS_SET).d_model
    if settings.k > settings.expansion * d_model:
        raise SafeDIGError(f"k={settings.k} exceeds the SAE width {settings.expansion * d_model}", "lower k")
    sae_cfg = SAEConfig(expansion=settings.expansion, k=settings.k, epochs=settings.epochs, seed=settings.seed)
    reporter.stage("train SAEs", settings.routed)
    run_train(work, [PAIRS_SET, BENIGN_SET], sae_cfg, progress=False, on_step=lambda _i: reporter.check())
    calib = {"benign": calibration, **checks}
    reporter.stage("calibrate the gate", sum(len(v) for v in calib.values()))
    harmful_from = (PAIRS_SET, TARGET_SET) if target else ()
    run_features(work, domain, PAIRS_SET, calib, FeatureConfig.for_sets(harmful_from, fire_rate=settings.fire_rate),
                 generator, progress=False)
    if target is not None:
        reporter.stage(f"adapt decoders to '{target.domain}'", 1)
        run_adapt(work, target.domain, TARGET_SET, AdaptConfig(epochs=target.epochs, pull=target.pull,
                                                               seed=settings.seed), progress=False)
        reporter.advance()
    if settings.choice_pairs:  # fit the affine target, then keep the map or the affine, as build-pack does
        reporter.stage("choose the Blend target", 1)
        choose_blend_target(work, generator, [PAIRS_SET, *([TARGET_SET] if target else [])], settings.choice_pairs)
        reporter.advance()
    refuse_overwrite(out, overwrite)  # a pack may have appeared under this name while the build ran
    return run_export(work, out, {"build": "SafeDIGBuildDictionary", "settings": asdict(settings),
                                  "wall_seconds": round(time.time() - t0, 1), "plan": plan.detail,
                                  **(provenance or {})})


def choice_generations(settings: BuildSettings) -> int:
    """Generations of the Blend target's choice (pipeline.choose_blend_target): the unsafe and the safe prompt
    of each pair once, and the unsafe one under each candidate target and gain."""
    return settings.choice_pairs * (2 + sum(len(gains) for gains in GAINS.values()))


def _unsafe_checks(pairs: Sequence[PromptRecord]) -> list[PromptRecord]:
    """Unsafe prompts of the held-out pairs (kept out of SAE training): the gate's measured recall."""
    return [r for i, r in enumerate(pairs) if r.label and is_heldout(r, i)]


def _collect_sets(generator: Generator, sets: dict[str, Sequence[PromptRecord]], work: Path,
                  settings: BuildSettings, reporter: Reporter, positions: list[str]) -> None:
    capture = evenly_spaced_steps(generator.steps, settings.capture_steps)
    for name, records in sets.items():
        reporter.stage(f"sample and capture '{name}' prompts", len(records))
        done = _finished_prompts(work / "collect" / name, settings.shard_size, len(records))
        reporter.advance(done)
        collect(generator, records, work / "collect" / name, capture_steps=capture, positions=positions,
                shard_size=settings.shard_size, batch_size=1, max_tokens=settings.max_tokens or None,
                progress=False)


def _finished_prompts(folder: Path, shard_size: int, n: int) -> int:
    done = sum(1 for _ in folder.glob("shard-*.safetensors")) if folder.exists() else 0
    return min(n, done * shard_size)


# ------------------------------------------------------------------------------------------ adapt


def sae_from_pack(pack: DictionaryPack, position: str) -> TopKSAE:
    """The pack's encoder and source decoder at `position` as a TopKSAE (float32)."""
    from ..pack import decoder_key, encoder_key

    info = pack.position_info(position)
    sae = TopKSAE(info.d_model, info.d_sae, info.k, info.scale)
    t = pack.tensors
    with torch.no_grad():
        for name in ("W_enc", "b_enc", "b_pre"):
            getattr(sae.encoder, name).copy_(t[encoder_key(position, name)].float())
        for name in ("W_dec", "b_dec"):
            getattr(sae.decoder, name).copy_(t[decoder_key(pack.source_domain, position, name)].float())
    return sae.eval()


@_with_autograd
def adapt_pack(pack_path: Path, generator: Generator, pairs: Sequence[PromptRecord], benign: Sequence[PromptRecord],
               domain: str, out: Path, work: Path, settings: BuildSettings, *, reporter: Reporter | None = None,
               overwrite: bool = False, epochs: float = 3.0, pull: float = AdaptConfig.pull,
               plan_seconds: float | None = None) -> Path:
    """Add `domain` to a pack: target pairs and benign prompts sampled on the model, the encoders and the
    harmful ids frozen, the decoders adapted (pull to the source decoder), weights, anchor and tau re-fit."""
    reporter = reporter or Reporter()
    out = Path(out)
    pack = load_pack(pack_path)
    pack.check_compatible(resolve(generator.model))
    if not domain.strip():
        raise SafeDIGError("no domain name", "name the new risk domain, e.g. violence")
    if domain in pack.domains:
        raise SafeDIGError(f"the pack already has a domain {domain!r}", f"choose a name other than {pack.domains}")
    check_pairs(pairs, "target prompt pairs")
    check_benign(benign)
    refuse_overwrite(out, overwrite)
    settings = replace(settings, positions=tuple(pack.positions))
    plan = estimate(generator, settings, len(pairs) + len(benign), len(benign), plan_seconds)
    for line in plan.lines():
        print(line, flush=True)
    plan.check(work)
    t0 = time.time()
    _collect_sets(generator, {TARGET_SET: pairs, BENIGN_SET: benign}, work, settings, reporter, pack.positions)
    target, negatives = ActivationSet(work / "collect" / TARGET_SET), ActivationSet(work / "collect" / BENIGN_SET)
    saes = {p: sae_from_pack(pack, p) for p in pack.positions}
    harmful = {p: pack.position_info(p).harmful_ids for p in pack.positions}
    cfg_f = FeatureConfig(fire_rate=settings.fire_rate)
    store = _stored_dtype(pack)
    features, decoders, metrics = {}, {}, {}
    reporter.stage("adapt decoders", len(saes))
    for p, sae in saes.items():
        features[p] = domain_features(sae, target, [negatives], p, harmful[p], cfg_f)
        adapt_cfg = AdaptConfig(epochs=epochs, pull=pull, seed=settings.seed, store_dtype=store)
        decoder, metrics[p] = adapt_decoder(sae, [target], p, adapt_cfg, work / "adapt" / domain / p, progress=False,
                                            on_step=lambda _i: reporter.check())
        assert isinstance(decoder, SAEDecoder)
        decoders[p] = (decoder.W_dec.detach(), decoder.b_dec.detach())
        reporter.advance()
    reporter.stage("calibrate the gate", len(benign))
    zh = _calibration_cache(work, "benign", generator, benign, saes, harmful, progress=False)
    entry = _domain_entry(domain, TARGET_SET, features, {"benign": zh}, "benign", [BENIGN_SET], cfg_f)
    maps, fits = {}, {}
    for p, sae in saes.items():  # the learned Blend target, fit on the new domain's pairs, its own decoder
        maps[p], fits[p] = fit_blend_map(sae, [target], p, harmful[p], w_dec=decoders[p][0])
    new = DomainEntry({p: DomainFeatures(f["harmful_weights"], f["safe_anchor_ids"], f["safe_anchor_values"],
                                         f["tau"], {"detection_auroc": f["detection_auroc"], "blend_fit": fits[p]},
                                         blend_target=BLEND_MAP if fits[p]["tokens"] else BLEND_ANCHOR)
                       for p, f in entry["positions"].items()},
                      adapted_from=pack.source_domain, extra={"calibration": entry["calibration"]})
    position_metrics = {p: {f"fve_{domain}": m["fve_target_adapted"], f"fve_{domain}_src_dec":
                            m["fve_target_source_decoder"]} for p, m in metrics.items()}
    refuse_overwrite(out, overwrite)
    return with_domain(pack, domain, new, decoders, position_metrics, out,
                       blend_maps={p: m for p, m in maps.items() if fits[p]["tokens"]}, adaptation={
        "domain": domain, "build": "SafeDIGAdaptDictionary", "safedig_version": __version__,
        "model": generator.spec, "prompts": {"target": len(pairs), "benign": len(benign)}, "epochs": epochs,
        "pull": pull, "created": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "wall_seconds": round(time.time() - t0, 1)})


def _stored_dtype(pack: DictionaryPack) -> str:
    dtype = pack.tensors[next(k for k in pack.tensors if k.endswith("W_dec"))].dtype
    return {torch.float16: "float16", torch.bfloat16: "bfloat16"}.get(dtype, "float32")
