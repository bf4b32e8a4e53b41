"""The core of Build / Adapt Dictionary without ComfyUI (safedig_core/training/build.py): the plan and its
refusals, prompt-set checks, the shipped prompt sets, and a build that stops midway and resumes."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from safedig_core.errors import SafeDIGError
from safedig_core.pack import load_pack
from safedig_core.training.build import (
    BuildPlan,
    BuildSettings,
    Reporter,
    _unsafe_checks,
    build_pack,
    check_benign,
    check_pairs,
    choice_generations,
    plan_costs,
)
from safedig_core.training.collect import PromptRecord, parse_prompt_lines, read_prompt_file

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ROOT / "dictionaries" / "prompts"
POSITIONS = ["double.0.img.attn", "double.0.txt.mlp", "single.0.out"]


def _plan(**settings):
    return plan_costs(d_model=3072, positions=POSITIONS, image_tokens=4096, text_tokens=256, steps=20,
                      calls_per_step=1, settings=BuildSettings(**settings), n_collect=300, n_calibrate=200,
                      seconds_per_generation=30.0, train_flops_per_second=1e11)


def test_plan_scales_with_the_settings_and_refuses_what_cannot_fit(tmp_path):
    small, large = _plan(max_tokens=64), _plan(max_tokens=128)
    # txt.mlp holds 256 tokens, the others more: every position is cut to max_tokens.
    assert large.disk_bytes - small.disk_bytes == 300 * 4 * 3 * 64 * 3072 * 2
    assert _plan(max_tokens=64, capture_steps=2).disk_bytes < small.disk_bytes
    assert small.seconds == pytest.approx(500 * 30.0 + small.detail["train_seconds"])
    with pytest.raises(SafeDIGError, match="lower max_tokens_per_row, capture_steps or the candidate positions"):
        BuildPlan(1, 10**18, 1, 1.0, small.detail).check(tmp_path, free_ram=10**12)
    with pytest.raises(SafeDIGError, match="of memory at its peak"):
        small.check(tmp_path, free_ram=1000)
    small.check(tmp_path, free_ram=10**12)  # fits
    assert "activation storage" in "\n".join(small.lines())


def test_plan_command_prints_the_flux_dev_plan():
    out = subprocess.run([sys.executable, "-m", "safedig_core", "plan", "flux-dev", "--max-tokens", "64",
                          "--expansion", "4", "--cpu-gflops", "100"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert "114 candidate positions, 64 tokens kept per row, width 3072" in out.stdout


def test_bad_settings_and_prompt_sets_are_named():
    with pytest.raises(SafeDIGError, match="capture_steps=0"):
        BuildSettings(capture_steps=0)
    with pytest.raises(SafeDIGError, match="line 2 is not a prompt record"):
        parse_prompt_lines('{"text": "a", "label": "unsafe", "pair": 0}\n{"text": "b", "label": "maybe"}\n')
    pair = [PromptRecord("a", 1, 0, 0), PromptRecord("b", 1, 0, 0), PromptRecord("c", 1, 1, 1),
            PromptRecord("d", 0, 1, 1)]
    with pytest.raises(SafeDIGError, match=r"pair\(s\) \[0\] do not hold exactly one unsafe and one safe"):
        check_pairs(pair)
    with pytest.raises(SafeDIGError, match="holds unsafe prompts"):
        check_benign([PromptRecord("a", 1, 0)])


@pytest.mark.parametrize("name", ["violence_pairs.jsonl", "weapons_pairs.jsonl"])
def test_starter_pair_sets_are_matched_and_large_enough(name):
    records = read_prompt_file(PROMPTS / name)
    check_pairs(records)
    pairs_per_subdomain = Counter(r.subdomain for r in records if r.label)
    assert sum(pairs_per_subdomain.values()) >= 64 and len(pairs_per_subdomain) >= 4
    assert min(pairs_per_subdomain.values()) >= 8, pairs_per_subdomain
    assert len({r.text for r in records}) == len(records)


def test_benign_calibration_set_and_bundled_sets_match_their_generator():
    benign = read_prompt_file(PROMPTS / "benign_calibration.jsonl")
    check_benign(benign)
    assert len(benign) >= 160
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import export_prompt_sets
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    for name in export_prompt_sets.BUNDLED_SETS:
        assert (PROMPTS / name).read_text() == export_prompt_sets.bundled_lines(name), name
        records = read_prompt_file(PROMPTS / name)
        (check_benign if "benign" in name else check_pairs)(records)


class StopAfter(Reporter):
    def __init__(self, prompts: int | None):
        self.left, self.sampled = prompts, 0

    def stage(self, name, total):
        pass

    def advance(self, n=1):
        self.sampled += n

    def check(self):
        if self.left is not None and self.sampled >= self.left:
            raise KeyboardInterrupt


def test_a_stopped_build_leaves_no_pack_and_resumes(tmp_path):
    from safedig_core.training.generators import BundledGenerator

    rows = [json.loads(x) for x in (PROMPTS / "bundled_source_pairs.jsonl").read_text().splitlines()]
    pairs = parse_prompt_lines("".join(json.dumps(r) + "\n" for r in rows if r["pair"] % 8 == 0))
    benign = read_prompt_file(PROMPTS / "bundled_benign.jsonl")[::4]
    settings = BuildSettings(capture_steps=2, positions=("single.0.out", "input.txt"), routed=1, expansion=2,
                             k=8, epochs=1.0, shard_size=8, choice_pairs=2)

    def run(reporter):
        generator = BundledGenerator(steps=4)
        runs = []
        original = generator.run

        def counted(texts, seeds, on_step):
            runs.append(len(texts))
            reporter.advance(len(texts))
            reporter.check()
            return original(texts, seeds, on_step)
        generator.run = counted  # type: ignore[method-assign]
        generator.max_batch = 1
        build_pack(generator, pairs, benign, tmp_path / "pack.safetensors", tmp_path / "work", settings,
                   domain="hazard", reporter=reporter, plan_seconds=0.1)
        return sum(runs)

    with pytest.raises(KeyboardInterrupt):
        run(StopAfter(20))
    assert not (tmp_path / "pack.safetensors").exists() and not list(tmp_path.rglob("*.tmp"))
    assert len(list((tmp_path / "work" / "collect" / "source").glob("shard-*.safetensors"))) == 2
    resumed = run(StopAfter(None))
    # collect, calibration, and the Blend target's choice on 2 pairs
    every_generation = len(pairs) + 2 * len(benign) + len(_unsafe_checks(pairs)) + choice_generations(settings)
    assert resumed == every_generation - 16  # the two finished shards (16 prompts) were not sampled again
    pack = load_pack(tmp_path / "pack.safetensors")
    assert pack.domains == ["hazard"]
    chosen = {pack.domain_features("hazard", p).blend_target for p in pack.positions}
    assert len(chosen) == 1 and chosen <= {"map", "affine"}  # one learned target for the pack, as build-pack picks
    fit = pack.domain_features("hazard", pack.positions[0]).extra["blend_fit"]
    assert set(fit["choice_distances"]) == {"map x1", "map x1.5", "map x2", "map x3", "affine x1", "affine x1.5"}
