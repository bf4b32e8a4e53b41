"""The whole pipeline through the CLI on a tiny random-weight FluxPipeline loaded from a folder:
collect -> route -> train -> features -> adapt -> export, then the pack round-trips and steers."""

import json

import pytest
import torch
from planted import tiny_embeddings, tiny_pipeline
from safetensors.torch import load_file

from safedig_core import SteeringDictionary, SteeringHooks, SteeringParams, load_pack
from safedig_core.cli import main
from safedig_core.pack import decoder_key, encoder_key
from safedig_core.steering_math import steer
from safedig_core.training.collect import world_prompts

from tiny_models import flux_inputs

SETS = {"source": world_prompts("source", 8, seed=0), "target": world_prompts("target", 8, seed=0),
        "benign": world_prompts("benign", 6, seed=0)}
CALIB = world_prompts("benign", 12, seed=5)


def write_prompts(path, records):
    path.write_text("\n".join(json.dumps({"text": r.text, "label": r.label, "pair": r.pair, "subdomain": r.subdomain,
                                          "seed": r.seed}) for r in records))
    return str(path)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    tiny_pipeline("flux", seed=2).save_pretrained(root / "pipe")
    texts = [r.text for recs in [*SETS.values(), CALIB] for r in recs]
    tiny_embeddings("flux", texts).save(root / "embeds.safetensors")
    run = str(root / "run")
    common = ["--run", run, "--threads", "1", "--no-progress"]
    for name, records in SETS.items():
        assert main(["collect", *common, "--set", name, "--prompts", write_prompts(root / f"{name}.jsonl", records),
                     "--backend", "diffusers", "--model-dir", str(root / "pipe"), "--prompt-embeds",
                     str(root / "embeds.safetensors"), "--steps", "4", "--capture-steps", "3", "--height", "64",
                     "--width", "64", "--device", "cpu", "--shard-size", "16", "--batch-size", "16"]) == 0
    assert main(["route", *common, "-R", "3"]) == 0
    assert main(["train", *common, "--expansion", "4", "--k", "8", "--epochs", "3", "--batch-size", "256"]) == 0
    assert main(["features", *common, "--domain", "hazard", "--calib",
                 f"benign={write_prompts(root / 'calib.jsonl', CALIB)}", "--calib", "seen=set:benign",
                 "--n-harmful", "8"]) == 0
    assert main(["adapt", *common, "--domain", "toxic", "--epochs", "3"]) == 0
    assert main(["export", *common, "--out", str(root / "pack.safetensors")]) == 0
    return root


def test_pack_round_trip_holds_every_stage_output(built):
    run = built / "run"
    pack = load_pack(built / "pack.safetensors")
    routing = json.loads((run / "routing.json").read_text())
    routed = [c["position"] for c in sorted(routing["candidates"], key=lambda c: c["rank"]) if c["selected"]]
    assert sorted(pack.positions) == sorted(routed) and len(routed) == 3
    assert len(pack.metadata["routing"]["candidates"]) == 11  # every candidate (input.txt too), with its criteria
    assert all({"separability", "loso", "transfer", "timestep_cv", "score"} <= set(c)
               for c in pack.metadata["routing"]["candidates"])
    assert pack.source_domain == "hazard" and pack.domains == ["hazard", "toxic"]
    assert pack.metadata["domains"]["toxic"]["adapted_from"] == "hazard"
    for pos in routed:
        sae = load_file(str(run / "sae" / pos / "sae.safetensors"))
        adapted = load_file(str(run / "adapt" / "toxic" / pos / "decoder.safetensors"))
        t = pack.tensors
        assert t[encoder_key(pos, "W_enc")].dtype == torch.float16  # lossless: training rounded the weights
        assert torch.equal(t[encoder_key(pos, "W_enc")].float(), sae["encoder.W_enc"])
        assert torch.equal(t[encoder_key(pos, "b_pre")].float(), sae["encoder.b_pre"])
        assert torch.equal(t[decoder_key("hazard", pos, "W_dec")].float(), sae["decoder.W_dec"])
        assert torch.equal(t[decoder_key("toxic", pos, "W_dec")].float(), adapted["W_dec"])
        assert not torch.equal(t[decoder_key("toxic", pos, "W_dec")], sae["decoder.W_dec"])
        info = pack.position_info(pos)
        assert set(info.metrics) >= {"fve", "dead_fraction", "l0", "fve_toxic"} and info.scale == float(sae["scale"])
        for domain in pack.domains:
            f = pack.domain_features(domain, pos)
            assert min(f.harmful_weights) >= 0 and abs(sum(f.harmful_weights) - 1) < 1e-4
    rates = pack.metadata["domains"]["hazard"]["calibration"]["fire_rate_hard_gate"]
    assert rates["benign"] <= 0.01 and "seen" in rates
    prov = pack.metadata["provenance"]
    assert prov["model"]["backend"] == "diffusers" and prov["prompts_per_set"] == {"benign": 30, "source": 48,
                                                                                      "target": 32}


def test_inspect_shows_fve_per_position(built, capsys):
    assert main(["inspect", str(built / "pack.safetensors")]) == 0
    out = capsys.readouterr().out
    for pos in load_pack(built / "pack.safetensors").positions:
        line = next(line for line in out.splitlines() if line.startswith(pos))
        assert "fve=" in line and "l0=" in line and "dead_fraction=" in line
        assert "hazard=map(" in line or "hazard=anchor" in line  # the Blend target of each domain


def test_exported_pack_steers_the_model_it_was_trained_on(built):
    pipe = tiny_pipeline("flux", seed=2)
    pack = load_pack(built / "pack.safetensors")
    kw = flux_inputs(batch=2, seed=4)[1]
    with torch.no_grad():
        base = pipe.transformer(**kw)[0]
        scores = {}
        with SteeringHooks(pipe, SteeringDictionary(pack, "toxic"), SteeringParams(mode="off"),
                           on_scores=lambda p, s, g: scores.setdefault(p, s)):
            same = pipe.transformer(**kw)[0]
        with SteeringHooks(pipe, SteeringDictionary(pack, "toxic"), SteeringParams(mode="both", tau_override=-1.0)):
            steered = pipe.transformer(**kw)[0]
    assert torch.equal(base, same) and set(scores) == set(pack.positions)
    assert not torch.allclose(base, steered)


def test_rerunning_a_finished_stage_reuses_its_outputs(built, capsys):
    before = (built / "run" / "sae").stat().st_mtime_ns
    sae_files = {p: p.stat().st_mtime_ns for p in (built / "run" / "sae").rglob("sae.safetensors")}
    assert main(["train", "--run", str(built / "run"), "--expansion", "4", "--k", "8", "--epochs", "3",
                 "--batch-size", "256", "--threads", "1", "--no-progress"]) == 0
    assert {p: p.stat().st_mtime_ns for p in sae_files} == sae_files and before


def test_user_positions_and_harmful_ids_from_source_and_target(built, capsys):
    run = built / "run-user"
    run.mkdir()
    (run / "collect").symlink_to(built / "run" / "collect", target_is_directory=True)
    common = ["--run", str(run), "--threads", "1", "--no-progress"]
    routed = json.loads((built / "run" / "routing.json").read_text())
    chosen = [c["position"] for c in routed["candidates"] if not c["selected"]][:2][::-1]
    assert main(["route", *common, "--positions", "nowhere.0.out"]) == 2
    assert "not collected" in capsys.readouterr().err
    assert main(["route", *common, "--positions", ",".join(chosen)]) == 0
    routing = json.loads((run / "routing.json").read_text())
    assert "user-chosen" in routing["method"] and routing["user_positions"] == chosen
    assert [c["position"] for c in sorted(routing["candidates"], key=lambda c: c["rank"]) if c["selected"]] == chosen
    # every candidate keeps the router's scores
    assert {c["position"]: c["score"] for c in routing["candidates"]} == {c["position"]: c["score"]
                                                                         for c in routed["candidates"]}
    assert main(["train", *common, "--expansion", "4", "--k", "8", "--epochs", "3", "--batch-size", "256"]) == 0
    assert main(["features", *common, "--domain", "hazard", "--calib",
                 f"benign={write_prompts(built / 'calib.jsonl', CALIB)}", "--n-harmful", "8",
                 "--harmful-from", "source,target"]) == 0
    assert main(["adapt", *common, "--domain", "toxic", "--epochs", "3"]) == 0
    assert main(["export", *common, "--out", str(built / "pack-user.safetensors")]) == 0
    hazard = json.loads((run / "features" / "hazard.json").read_text())
    toxic = json.loads((run / "features" / "toxic.json").read_text())
    assert hazard["config"]["harmful_from"] == ["source", "target"]
    for pos in chosen:
        f = hazard["positions"][pos]
        assert len(f["harmful_ids"]) == len(set(f["harmful_ids"])) <= 8
        assert len(f["harmful_origin"]) == len(f["harmful_ids"]) and set(f["harmful_origin"]) <= {"source", "target"}
        assert set(f["harmful_smd_by_set"]) == {"source", "target"}
        assert toxic["positions"][pos]["harmful_ids"] == f["harmful_ids"]  # adapt keeps H
    pack = load_pack(built / "pack-user.safetensors")
    assert sorted(pack.positions) == sorted(chosen)
    assert pack.metadata["provenance"]["harmful_from"] == ["source", "target"]
    assert "user-chosen" in pack.metadata["routing"]["method"]
    for pos in chosen:
        assert pack.position_info(pos).harmful_ids == hazard["positions"][pos]["harmful_ids"]


def test_harmful_from_defaults_give_each_set_its_own_share():
    from argparse import Namespace

    from safedig_core.training.cli import BUILD_PACK_HARMFUL_FROM, _feature_cfg

    args = Namespace(n_harmful=None, n_anchor=8, min_smd=0.5, fire_rate=0.01, harmful_from=None)
    assert _feature_cfg(args).harmful_from == () and _feature_cfg(args).n_harmful == 32  # `features`: its own set
    both = _feature_cfg(args, BUILD_PACK_HARMFUL_FROM)  # `build-pack`: source and target, 32 each
    assert both.harmful_from == ("source", "target") and both.n_harmful == 64
    args.harmful_from, args.n_harmful = "none", None
    assert _feature_cfg(args, BUILD_PACK_HARMFUL_FROM).harmful_from == ()
    args.harmful_from, args.n_harmful = "source, target", 40
    assert _feature_cfg(args) == both.__class__(n_harmful=40, harmful_from=("source", "target"))


def test_learned_blend_maps_move_unsafe_tokens_toward_their_matched_safe_tokens(built):
    """Each domain's map, fit on its own pairs, brings the harmful tokens of the unsafe prompts nearer the
    aligned tokens of their safe counterparts than the constant anchor does (on those pairs: the fit's
    own objective, measured through the real steering code)."""
    from safedig_core.training.blend_map import _pair_rows, align_tokens, aligns_tokens
    from safedig_core.training.collect import ActivationSet

    pack = load_pack(built / "pack.safetensors")
    assert pack.metadata["format_version"] == 2
    for domain, set_name in (("hazard", "source"), ("toxic", "target")):
        aset = ActivationSet(built / "run" / "collect" / set_name)
        mapped = [p for p in pack.positions if pack.domain_features(domain, p).blend_target == "map"]
        assert mapped, domain
        for pos in pack.positions:  # a position where no harmful latent fired on the pairs keeps the anchor
            fit = pack.domain_features(domain, pos).extra["blend_fit"]
            assert (fit["tokens"] > 0) == (pos in mapped) and (pack.blend_map(domain, pos) is None) != (pos in mapped)
        for pos in mapped:
            dists = {}
            for label, p in (("map", pack), ("anchor", pack.without_blend_maps())):
                w = SteeringDictionary(p, domain).weights(pos, torch.device("cpu"), torch.float32)
                total, n = 0.0, 0
                for x_u, x_s in _pair_rows(aset, pos):
                    x_u, x_s = x_u.float(), x_s.float()
                    j = align_tokens(x_u, x_s) if aligns_tokens(pos) else torch.arange(len(x_u))
                    out = steer(x_u[None], w, SteeringParams(mode="blend", tau_override=0.0))[0]
                    moved = (out != x_u).any(-1)
                    total += float((out[moved] - x_s[j[moved]]).norm(dim=-1).sum())
                    n += int(moved.sum())
                dists[label] = total / max(n, 1)
            assert n > 0 and dists["map"] < dists["anchor"], (domain, pos, dists)


def test_affine_blend_targets_export_as_format_4_and_move_unsafe_tokens_toward_their_safe_tokens(built, tmp_path):
    """`apply_blend_choice(run, "affine", ...)` (what build-pack does when the affine target wins) exports a
    format-4 pack whose domains blend with the affine target fit on both domains' pairs; steered through the
    real steering code, the unsafe tokens of the pairs end nearer their aligned safe tokens than they started
    (the ridge fit's own objective)."""
    import shutil

    from safedig_core.training.blend_map import _pair_rows, align_tokens, aligns_tokens
    from safedig_core.training.collect import ActivationSet
    from safedig_core.training.pipeline import apply_blend_choice, fit_shared_affines, run_affines, run_export

    run = tmp_path / "run"
    shutil.copytree(built / "run", run, symlinks=True)
    assert not run_affines(run)  # the stages before build-pack's choice fit no affine target
    fit_shared_affines(run, ["source", "target"], keep=["benign"])
    affines = run_affines(run)
    assert affines and {d for d, _ in affines} == {"hazard", "toxic"}
    for p in {p for _, p in affines}:  # one fit on both domains' pairs, shared by the domains
        assert torch.equal(affines[("hazard", p)], affines[("toxic", p)])
    toxic = json.loads((run / "features" / "toxic.json").read_text())
    for _, p in affines:
        fit = toxic["positions"][p]["affine_fit"]
        assert fit["tokens"] > 0 and fit["pairs_from"] == ["source", "target"] and fit["kept_from"] == ["benign"]
    apply_blend_choice(run, "affine", 1.0, {"affine x1": 0.5})
    pack = load_pack(run_export(run, tmp_path / "affine.safetensors"))
    assert pack.metadata["format_version"] == 4
    for domain, set_name in (("hazard", "source"), ("toxic", "target")):
        aset = ActivationSet(run / "collect" / set_name)
        before = after = 0.0  # summed over the domain's positions: at some, no token of its pairs may fire
        for pos in [p for d, p in affines if d == domain]:
            f = pack.domain_features(domain, pos)
            assert f.blend_target == "affine" and f.extra["blend_fit"]["choice_distances"] == {"affine x1": 0.5}
            assert torch.equal(pack.blend_affine(domain, pos), affines[(domain, pos)])
            w = SteeringDictionary(pack, domain).weights(pos, torch.device("cpu"), torch.float32)
            for x_u, x_s in _pair_rows(aset, pos):
                x_u, x_s = x_u.float(), x_s.float()
                j = align_tokens(x_u, x_s) if aligns_tokens(pos) else torch.arange(len(x_u))
                out = steer(x_u[None], w, SteeringParams(mode="blend", tau_override=0.0))[0]
                before += float((x_u - x_s[j]).pow(2).sum())
                after += float((out - x_s[j]).pow(2).sum())
        assert after < before, (domain, before, after)


def test_text_alignment_pairs_words_around_a_swapped_phrase():
    from safedig_core.training.blend_map import align_tokens

    g = torch.Generator().manual_seed(0)
    prefix, suffix = torch.randn(3, 8, generator=g), torch.randn(4, 8, generator=g)
    unsafe_phrase, safe_phrase = torch.randn(4, 8, generator=g), torch.randn(2, 8, generator=g)
    unsafe = torch.cat([prefix, unsafe_phrase, suffix])
    safe = torch.cat([prefix, safe_phrase + 0.3 * unsafe_phrase[:2], suffix])
    j = align_tokens(unsafe, safe)
    assert j[:3].tolist() == [0, 1, 2] and j[-4:].tolist() == [5, 6, 7, 8]  # the suffix moved two tokens left
    assert {3, 4} <= set(j[3:7].tolist()) <= {2, 3, 4, 5}  # the phrase maps onto the phrase (give or take an edge)
    assert bool((j[1:] >= j[:-1]).all())


def test_blend_to_anchor_exports_a_map_free_version_1_pack(built, tmp_path):
    import shutil

    from safedig_core.training.pipeline import blend_to_anchor, run_export

    run = tmp_path / "run"
    shutil.copytree(built / "run", run, symlinks=True)
    blend_to_anchor(run)
    pack = load_pack(run_export(run, tmp_path / "anchor.safetensors"))
    assert pack.metadata["format_version"] == 1 and not any(k.startswith("blend.") for k in pack.tensors)
    assert all(pack.blend_map(d, p) is None for d in pack.domains for p in pack.positions)
    mapped = load_pack(built / "pack.safetensors")
    assert {k: v for k, v in mapped.tensors.items() if not k.startswith("blend.")}.keys() == pack.tensors.keys()


def test_build_pack_chooses_the_learned_target_nearest_the_safe_generations(built, tmp_path):
    """`choose_blend_target` (build-pack's last stage) on the tiny pipeline: every candidate (map at each
    gain, affine at each gain) is measured, the one with the smallest relative final-latent distance is
    applied to the run, and the exported pack blends with it."""
    import shutil

    from safedig_core.training.blend_map import GAINS, candidate_label
    from safedig_core.training.generators import make_generator
    from safedig_core.training.pipeline import choose_blend_target, open_set, run_export

    run = tmp_path / "run"
    shutil.copytree(built / "run", run, symlinks=True)
    generator = make_generator(open_set(run, "source").manifest["generator"])
    target, gain = choose_blend_target(run, generator, ["source", "target"], 4)
    pack = load_pack(run_export(run, tmp_path / "chosen.safetensors"))
    chosen = [p for p in pack.positions if pack.domain_features("hazard", p).blend_target == target]
    assert chosen
    distances = pack.domain_features("hazard", chosen[0]).extra["blend_fit"]["choice_distances"]
    assert set(distances) == {candidate_label(t, g) for t, gs in GAINS.items() for g in gs}
    assert all(d > 0 for d in distances.values())
    assert distances[candidate_label(target, gain)] == min(distances.values())
    assert pack.metadata["format_version"] == (4 if target == "affine" else 2)
    from safedig_core.errors import SafeDIGError
    from safedig_core.steering_math import SteeringParams
    from safedig_core.training.blend_map import choose_blend

    with pytest.raises(SafeDIGError, match="no matched"):  # prompt sets without a full pair: a clear refusal
        choose_blend(pack, {}, generator, [], SteeringParams(mode="blend"))


def test_the_affine_target_leaves_benign_tokens_nearly_where_they_are(built):
    """Fit with the benign set as `keep`, the affine target moves the benign tokens a mistaken latch would
    steer less than the same fit without it, and still moves the unsafe tokens."""
    from safedig_core.training.blend_map import _active_rows, fit_affine_map
    from safedig_core.training.pipeline import _saes, open_set

    run = built / "run"
    saes = _saes(run)
    harmful = json.loads((run / "features" / "hazard.json").read_text())["positions"]
    pairs, benign = [open_set(run, "source"), open_set(run, "target")], [open_set(run, "benign")]
    pos = next(p for p in saes if list(_active_rows(saes[p], benign, p, torch.tensor(harmful[p]["harmful_ids"]))))
    h = torch.tensor(harmful[pos]["harmful_ids"])
    free, _ = fit_affine_map(saes[pos], pairs, pos, harmful[pos]["harmful_ids"])
    kept, fit = fit_affine_map(saes[pos], pairs, pos, harmful[pos]["harmful_ids"], keep=benign)
    assert fit["kept_tokens"] > 0

    def moved(a, sets):
        rows = torch.cat(list(_active_rows(saes[pos], sets, pos, h)))
        return float((torch.cat([rows, torch.ones(len(rows), 1)], 1) @ a).norm(dim=-1).mean())

    assert moved(kept, benign) < 0.7 * moved(free, benign)
    assert moved(kept, pairs) > 0.1 * moved(free, pairs)
