"""Collection from diffusers FLUX / SD3 pipelines (tiny random weights, loaded from a local folder):
shard contents, the cond rows under CFG, batch independence, and a SIGKILLed run that resumes."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from planted import tiny_embeddings, tiny_pipeline

from safedig_core.cli import main
from safedig_core.errors import SafeDIGError
from safedig_core.training.collect import ActivationSet, PromptRecord, collect, token_stream, world_prompts
from safedig_core.training.generators import DiffusersGenerator, load_pipeline

ROOT = Path(__file__).resolve().parents[1]


def prompts(n_pairs: int = 3) -> list[PromptRecord]:
    return world_prompts("source", 1, seed=3)[: 2 * n_pairs]


@pytest.fixture(scope="module")
def flux_folder(tmp_path_factory):
    """A saved tiny FluxPipeline + a precomputed-embeddings file + a prompt file, as a user would have."""
    root = tmp_path_factory.mktemp("flux")
    tiny_pipeline("flux").save_pretrained(root / "pipe")
    records = world_prompts("source", 2, seed=1)
    tiny_embeddings("flux", [r.text for r in records]).save(root / "embeds.safetensors")
    (root / "prompts.jsonl").write_text("\n".join(json.dumps(
        {"text": r.text, "label": "unsafe" if r.label else "safe", "pair": r.pair, "subdomain": r.subdomain,
         "seed": r.seed}) for r in records))
    return root


def collect_args(folder: Path, out: Path, *extra: str) -> list[str]:
    return ["collect", "--run", str(out), "--set", "source", "--backend", "diffusers", "--model-dir",
            str(folder / "pipe"), "--prompt-embeds", str(folder / "embeds.safetensors"), "--prompts",
            str(folder / "prompts.jsonl"), "--steps", "3", "--capture-steps", "2", "--height", "64", "--width", "64",
            "--device", "cpu", "--shard-size", "2", "--batch-size", "2", "--threads", "1", "--no-progress", *extra]


def test_flux_pipeline_folder_collects_every_position(flux_folder, tmp_path):
    assert main(collect_args(flux_folder, tmp_path)) == 0
    aset = ActivationSet(tmp_path / "collect" / "source")
    assert aset.architecture == "flux" and aset.d_model == 64 and len(aset.positions) == 11
    assert aset.positions[0] == "input.txt"  # the text input projection is a candidate like the blocks
    assert aset.capture_steps == [0, 2] and len(aset.shards) == 6
    t = aset.read(aset.shards[0], ["row.prompt", "row.step", "act.double.0.img.attn", "act.double.1.txt.mlp",
                                   "act.single.1.out", "mean.single.1.out"])
    assert t["row.prompt"].tolist() == [0, 1, 0, 1] and t["row.step"].tolist() == [0, 0, 2, 2]
    assert t["act.double.0.img.attn"].shape == (4, 16, 64)  # 64x64 px -> 8x8 latent -> 16 packed tokens
    assert t["act.double.1.txt.mlp"].shape == (4, 12, 64)
    assert t["act.single.1.out"].shape == (4, 28, 64)  # single blocks see text + image tokens
    assert aset.read(aset.shards[0], ["act.input.txt"])["act.input.txt"].shape == (4, 12, 64)  # text tokens
    torch.testing.assert_close(t["mean.single.1.out"], t["act.single.1.out"].float().mean(1), atol=2e-3, rtol=1e-3)
    x, idx, _ = aset.means("double.0.img.attn")
    assert x.shape == (24, 64) and sorted(set(idx.tolist())) == list(range(12))


def test_rows_do_not_depend_on_the_batch(flux_folder, tmp_path):
    """Prompt 3 alone gives the same activations as inside a batch (noise from its seed only)."""
    pipe = load_pipeline(flux_folder / "pipe")
    records = world_prompts("source", 2, seed=1)
    gen = DiffusersGenerator(pipe, steps=3, height=64, width=64, embeddings=tiny_embeddings("flux",
                                                                                           [r.text for r in records]))
    collect(gen, records[:4], tmp_path / "batch", capture_steps=[1], shard_size=4, batch_size=4, progress=False)
    collect(gen, records[3:4], tmp_path / "alone", capture_steps=[1], shard_size=4, batch_size=1, progress=False)
    batch, alone = ActivationSet(tmp_path / "batch"), ActivationSet(tmp_path / "alone")
    for pos in ("double.0.txt.attn", "single.0.out"):
        a = batch.read(batch.shards[0], [f"act.{pos}"])[f"act.{pos}"][3]
        b = alone.read(alone.shards[0], [f"act.{pos}"])[f"act.{pos}"][0]
        torch.testing.assert_close(a.float(), b.float(), atol=2e-3, rtol=2e-3)


def test_sd3_with_cfg_stores_the_prompt_rows(tmp_path):
    """SD3 batches [negative; positive]. At step 0 both runs start from the same noise, so the stored rows
    with CFG (guidance 4) must equal those of a run without CFG (guidance 1): the prompt half, not the
    negative half. Equal up to the batch-size-dependent rounding of a batch of 4 rows against 2 (diffusers
    0.39 on CPU: 6e-5 on activations of size 0.2);"""
    records = prompts(2)
    emb = tiny_embeddings("sd3", [r.text for r in records])
    pipe = tiny_pipeline("sd3")
    for name, guidance in (("cfg", 4.0), ("plain", 1.0)):
        gen = DiffusersGenerator(pipe, steps=2, guidance=guidance, height=128, width=128, embeddings=emb)
        collect(gen, records, tmp_path / name, capture_steps=[0], shard_size=4, batch_size=4, progress=False)
    cfg, plain = ActivationSet(tmp_path / "cfg"), ActivationSet(tmp_path / "plain")
    assert cfg.architecture == "sd3" and "joint.1.txt.attn" not in cfg.positions  # last block: no text outputs
    for pos in cfg.positions:
        a = cfg.read(cfg.shards[0], [f"act.{pos}"])[f"act.{pos}"]
        b = plain.read(plain.shards[0], [f"act.{pos}"])[f"act.{pos}"]
        assert a.shape[0] == len(records)
        torch.testing.assert_close(a.float(), b.float(), atol=2e-3, rtol=2e-3, msg=pos)


def test_a_killed_collection_resumes_to_identical_shards(flux_folder, tmp_path):
    killed, fresh = tmp_path / "killed", tmp_path / "fresh"
    args = collect_args(flux_folder, killed, "--shard-size", "1", "--batch-size", "1", "--steps", "12")
    proc = subprocess.Popen([sys.executable, "-m", "safedig_core", *args], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(ROOT)})
    out = killed / "collect" / "source"
    deadline = time.time() + 120
    while not (out / "shard-00001.safetensors").exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.time() < deadline, "collection never wrote a shard"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = sorted(p.name for p in out.glob("shard-*.safetensors"))
    assert 2 <= len(done) < 12, done  # killed part-way
    with pytest.raises(SafeDIGError, match="unfinished"):
        ActivationSet(out)

    assert main(args) == 0  # the same command again: resumes
    assert main(collect_args(flux_folder, fresh, "--shard-size", "1", "--batch-size", "1", "--steps", "12")) == 0
    resumed, reference = ActivationSet(out), ActivationSet(fresh / "collect" / "source")
    names = [f"act.{p}" for p in reference.positions] + [f"mean.{p}" for p in reference.positions] + ["row.prompt"]
    for a, b in zip(resumed.shards, reference.shards, strict=True):
        ta, tb = resumed.read(a, names), reference.read(b, names)
        assert all(torch.equal(ta[k], tb[k]) for k in names), a.name

    # the same folder with another plan is refused instead of mixing two collections
    assert main(collect_args(flux_folder, killed, "--steps", "4")) == 2


def test_token_stream_is_deterministic_and_covers_each_token_once_per_epoch(flux_folder, tmp_path):
    assert main(collect_args(flux_folder, tmp_path)) == 0
    aset = ActivationSet(tmp_path / "collect" / "source")
    pos = "double.0.img.attn"
    total = sum(aset.read(s, [f"act.{pos}"])[f"act.{pos}"].shape[0] for s in aset.shards)
    from safedig_core.training.collect import count_tokens

    n_train = count_tokens([aset], pos)
    assert 0 < n_train < total * 16  # held-out rows are excluded
    take = lambda s: torch.cat([next(s) for _ in range(n_train // 8)])  # noqa: E731
    a = take(token_stream([aset], pos, 8, seed=1, buffer_tokens=50))
    b = take(token_stream([aset], pos, 8, seed=1, buffer_tokens=50))
    c = take(token_stream([aset], pos, 8, seed=2, buffer_tokens=50))
    assert torch.equal(a, b) and not torch.equal(a, c)
    whole = torch.cat([aset.read(s, [f"act.{pos}"])[f"act.{pos}"].float().reshape(-1, 64) for s in aset.shards])
    assert a.shape[0] == n_train // 8 * 8 and all((whole == row).all(1).any() for row in a[:20])
