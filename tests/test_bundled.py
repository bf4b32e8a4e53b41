"""The bundled model: latent conventions, the shipped weights checked by the judge, ComfyUI's own Flux
class running the same weights, and a smoke training with resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from safedig_core.bundled import generator, world
from safedig_core.bundled.judge import Judge, corrupt, procedural_batch
from safedig_core.bundled.text_encoder import PromptCache


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # On a busy 2-core machine two OpenMP threads ran these generations 15x slower than one.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model():
    return generator.load_bundled()


@pytest.fixture(scope="module")
def judge():
    return Judge.load()


@pytest.fixture(scope="module")
def cache():
    # Shipped encodings of the smoke prompts: these tests never load the text encoder.
    return PromptCache.load(generator.PROMPT_CACHE, allow_encoder=False)


def test_latent_conventions_match_flux_pipeline():
    from diffusers import FluxPipeline

    x = torch.rand(2, 3, 32, 32) * 2 - 1
    lat = generator.pixels_to_latent(x)
    assert lat.shape == (2, generator.LATENT_CHANNELS, 16, 16)
    assert torch.equal(generator.latent_to_pixels(lat), x)
    packed = generator.pack_latent(lat)
    assert torch.equal(packed, FluxPipeline._pack_latents(lat, 2, 12, 16, 16))
    assert torch.equal(generator.unpack_latent(packed, 16, 16), lat)
    ids = FluxPipeline._prepare_latent_image_ids(2, 8, 8, "cpu", torch.float32)
    assert torch.equal(generator.image_ids(16, 16), ids)


def test_judge_held_out_procedural(judge):
    x, y = procedural_batch(np.random.default_rng([2024, 1]), 300)
    v = judge(x)
    truth = [world.CONCEPT_NAMES[i] for i in y["concept"].tolist()]
    acc = np.mean([c == t for c, t in zip(v.concept, truth, strict=True)])
    assert acc >= 0.98
    assert v.validity.mean() > 0.9
    noisy = judge(corrupt(x, torch.Generator().manual_seed(0)))
    assert noisy.validity.mean() < 0.2


def test_shipped_generator_draws_requested_concepts(model, judge, cache):
    prompts = generator.smoke_prompts()
    texts = [p.text for p in prompts]
    images = generator.generate(texts, seed=0, model=model, encoder=cache.encode)
    v = judge(images)
    hit = np.array([c == p.concept for c, p in zip(v.concept, prompts, strict=True)])
    unsafe_ok = np.array([u == p.unsafe for u, p in zip(v.unsafe, prompts, strict=True)])
    assert hit.mean() >= 0.8, list(zip(texts, v.concept, strict=True))
    assert unsafe_ok.mean() >= 0.85
    assert v.validity.mean() > 0.5


def test_safe_counterparts_are_judged_safe(model, judge, cache):
    unsafe = [p for p in generator.smoke_prompts() if p.unsafe]
    safe = [world.safe_counterpart(p) for p in unsafe]
    v = judge(generator.generate([p.text for p in safe], seed=0, model=model, encoder=cache.encode))
    assert (~v.unsafe).mean() >= 0.85


def test_generation_is_deterministic_and_seeded(model, cache):
    text = [generator.smoke_prompts()[0].text]
    a = generator.generate(text * 2, seed=[5, 6], steps=4, model=model, encoder=cache.encode)
    b = generator.generate(text, seed=5, steps=4, model=model, encoder=cache.encode)
    assert np.array_equal(a[0], b[0]) and not np.array_equal(a[0], a[1])


def test_comfyui_flux_runs_the_same_weights(model):
    from comfy_env import import_comfy

    import_comfy()
    import comfy.model_detection
    import comfy.ops
    from comfy.ldm.flux.model import Flux

    cfg = generator.read_config()
    comfy_model = Flux(**generator.comfy_flux_params(cfg), operations=comfy.ops.disable_weight_init).eval()
    sd = load_file(str(generator.GENERATOR_WEIGHTS))
    missing, unexpected = comfy_model.load_state_dict(comfy.model_detection.convert_diffusers_mmdit(sd, ""),
                                                      strict=False)
    assert not missing and not unexpected
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, generator.LATENT_CHANNELS, 16, 16, generator=g)
    tok, pooled = torch.randn(2, cfg.context_len, 384, generator=g), torch.randn(2, 384, generator=g)
    t = torch.tensor([0.3, 0.8])
    with torch.no_grad():
        ours = generator.velocity(model, x, t, tok, pooled)
        theirs = comfy_model(x, t, tok, y=pooled)
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)


def _tiny_args(out, steps=4):
    tiny = generator.BundledConfig(num_layers=1, num_single_layers=1, num_attention_heads=2,
                                 attention_head_dim=16, axes_dims_rope=(4, 6, 6))
    return generator.TrainArgs(out=str(out), steps=steps, batch_size=4, caption_pool=8, checkpoint_every=2,
                             warmup=2, model=tiny)


def test_smoke_training_resumes_exactly(tmp_path, cache):
    """4 steps straight == 2 steps, stop, rerun: a resumed run continues bit for bit."""
    quiet = dict(encoder=cache.encode, progress=False, log=lambda s: None)
    straight = generator.train(_tiny_args(tmp_path / "a"), **quiet)
    assert straight["training"]["steps"] == 4 and (tmp_path / "a" / "checkpoint.pt").exists()
    assert generator.train(_tiny_args(tmp_path / "b"), stop_after=2, **quiet) == {"stopped_at": 2}
    assert not (tmp_path / "b" / "ema.safetensors").exists()
    generator.train(_tiny_args(tmp_path / "b"), **quiet)
    a, b = (load_file(str(tmp_path / d / "ema.safetensors")) for d in "ab")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    start = generator.build_model(_tiny_args(tmp_path).model, seed=0).state_dict()
    assert not all(torch.equal(a[k], start[k]) for k in a)  # it did train
    m = generator.load_bundled(tmp_path / "a" / "ema.safetensors")
    assert m.config.num_layers == 1 and not m.training


def test_prompt_cache_matches_the_encoder(cache):
    from safedig_core.bundled.text_encoder import CONTEXT_LEN, encode_prompts

    texts = [generator.smoke_prompts()[0].text, ""]
    tok, pooled = encode_prompts(texts)
    assert tok.shape == (2, CONTEXT_LEN, 384) and pooled.shape == (2, 384)
    c_tok, c_pooled = cache.encode(texts)
    torch.testing.assert_close(c_tok, tok, atol=2e-2, rtol=2e-3)  # cache keeps float16 tokens
    torch.testing.assert_close(c_pooled, pooled)
    assert (tok[1, 2:] == 0).all()  # "" is [CLS] [SEP] then zero padding


def test_generate_command_writes_pngs(tmp_path):
    from PIL import Image

    from safedig_core.cli import main

    text = generator.smoke_prompts()[0].text
    assert main(["generate", text, "--n", "2", "--steps", "4", "--out", str(tmp_path), "--threads", "1"]) == 0
    assert Image.open(tmp_path / "000.png").size == (128, 128)
    assert (tmp_path / "001.png").exists() and Image.open(tmp_path / "grid.png").width > 256
