"""The SafeDIG nodes inside the real ComfyUI, in-process: ComfyUI's own SD3 (MMDiT) and Flux classes, its
BaseModel.apply_model wrapper chain and its sampler (comfy.sample.sample). No server, no mocks."""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch

from safedig_core import SteeringDictionary, safedig_hooks
from safedig_core.errors import PackError, SafeDIGError
from safedig_core.pack import DictionaryPack
from safedig_core.synthetic import random_pack

from comfy_env import ROOT, import_comfy
from tiny_models import SD3_CFG, comfy_sd3_from, diffusers_sd3

pytestmark = pytest.mark.comfy_inprocess

SD3_POSITIONS = ["joint.0.txt.mlp", "joint.0.img.attn", "joint.1.img.mlp"]


def pack_module():
    """The repo root loaded as a package (as ComfyUI loads it from custom_nodes/), with its `nodes`."""
    import_comfy()
    name = "safedig_comfy_pack"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "__init__.py",
                                                      submodule_search_locations=[str(ROOT)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    importlib.import_module(f"{name}.nodes")
    return sys.modules[f"{name}.nodes"]


def firing_dictionary(arch: str, d_model: int, positions: list[str], seed: int = 0, **kw) -> SteeringDictionary:
    """A random pack whose gate opens on most tokens (tau 0, many harmful latents)."""
    opts = dict(expansion=2, k=16, n_harmful=24, tau=0.0, seed=seed)
    opts.update(kw)
    meta, tensors = random_pack(arch, d_model, positions, **opts)
    return SteeringDictionary(DictionaryPack(f"<{arch}-{d_model}-test>", meta, tensors))


@pytest.fixture(scope="module")
def nodes():
    return pack_module()


@pytest.fixture(scope="module")
def sd3():
    return comfy_sd3_from(diffusers_sd3())


@pytest.fixture(scope="module")
def sd3_dict():
    return firing_dictionary("sd3", 128, SD3_POSITIONS)


def steer(nodes, model, dictionary, **kw):
    args = dict(enabled=True, mode="Blend", blend_strength=1.0, repel_strength=1.0, gate="hard",
                override_threshold=False, threshold=0.0, apply_to="cond", start_percent=0.0, end_percent=1.0,
                positions="")
    args.update(kw)
    return nodes.Steer.execute(model=model, dictionary=dictionary, **args).result[0]


def sd3_conds(seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    ctx = torch.randn(1, 5, SD3_CFG["ctx_dim"], generator=g)
    pooled = torch.randn(1, SD3_CFG["pooled"], generator=g)
    return [[ctx, {"pooled_output": pooled}]]


def sample(model, cfg: float, batch: int = 1, steps: int = 3, seed: int = 7):
    import comfy.sample

    latent = torch.zeros(batch, SD3_CFG["latent_ch"], 8, 8)
    noise = comfy.sample.prepare_noise(latent, seed)
    return comfy.sample.sample(model, noise, steps, cfg, "euler", "simple", sd3_conds(3), sd3_conds(4), latent,
                               seed=seed)


def test_identity_settings_return_the_input_model_itself(nodes, sd3, sd3_dict):
    for kw in (dict(enabled=False), dict(mode="Off"), dict(mode="Blend", blend_strength=0.0),
               dict(mode="Repel", repel_strength=0.0), dict(mode="Both", blend_strength=0.0, repel_strength=0.0)):
        assert steer(nodes, sd3, sd3_dict, **kw) is sd3, kw
    out = steer(nodes, sd3, sd3_dict)
    assert out is not sd3 and out.model is sd3.model  # a clone sharing the weights
    assert nodes.steer.steer_patches(out) and not nodes.steer.steer_patches(sd3)


def test_sampling_steers_and_leaves_no_trace(nodes, sd3, sd3_dict):
    base = sample(sd3, cfg=1.0)
    steered_model = steer(nodes, sd3, sd3_dict)
    steered = sample(steered_model, cfg=1.0)
    assert not torch.equal(base, steered)
    assert safedig_hooks(sd3.model) == []
    assert torch.equal(sample(sd3, cfg=1.0), base)  # the shared model was not changed
    # Chained: a second Steer on top of the first steers again (its own hooks, its own owner).
    chained = steer(nodes, steered_model, firing_dictionary("sd3", 128, SD3_POSITIONS, seed=5))
    assert len(nodes.steer.steer_patches(chained)) == 2 and len(nodes.steer.steer_patches(steered_model)) == 1
    assert not torch.equal(sample(chained, cfg=1.0), steered)
    assert safedig_hooks(sd3.model) == []


def test_step_range_is_reported(nodes, sd3, sd3_dict):
    model = steer(nodes, sd3, sd3_dict, start_percent=0.5)
    assert not torch.equal(sample(model, cfg=1.0), sample(sd3, cfg=1.0))
    rec = nodes.steer.steer_patches(model)[0].recorder
    assert sorted(rec.steps_seen) == [1, 2] and rec.entries
    assert "steps steered: 2-3 of 3" in rec.summary()


def _apply(model, x, sigma, chunks, ctx, pooled):
    """One BaseModel.apply_model call as comfy.samplers.calc_cond_batch makes it (wrappers, chunk labels)."""
    import comfy.patcher_extension as pe

    opts = {"wrappers": pe.merge_nested_dicts({}, model.wrappers), "cond_or_uncond": list(chunks),
            "sigmas": sigma, "sample_sigmas": torch.tensor([1.0, 0.5, 0.0])}
    with torch.no_grad():
        return model.model.apply_model(x, sigma, c_crossattn=ctx, y=pooled, transformer_options=opts)


@pytest.mark.parametrize("chunks,apply_to,changed", [
    ((1, 0), "cond", [False, True]),     # ComfyUI puts uncond first: row 1 is the positive prompt
    ((0, 1), "cond", [True, False]),
    ((1, 0), "uncond", [True, False]),
    ((1, 0), "both", [True, True]),
    ((0,), "cond", [True, True]),        # cfg 1 (Flux): one cond chunk of 2 images, both steered
    ((0,), "uncond", [False, False]),
])
def test_rows_follow_cond_or_uncond(nodes, sd3, sd3_dict, chunks, apply_to, changed):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, SD3_CFG["latent_ch"], 8, 8, generator=g).expand(2, -1, -1, -1).contiguous()
    ctx = torch.randn(1, 5, SD3_CFG["ctx_dim"], generator=g).expand(2, -1, -1).contiguous()
    pooled = torch.randn(1, SD3_CFG["pooled"], generator=g).expand(2, -1).contiguous()
    sigma = torch.tensor([1.0, 1.0])
    plain = _apply(sd3, x, sigma, chunks, ctx, pooled)
    assert torch.allclose(plain[0], plain[1], atol=1e-5)  # same input in both rows
    out = _apply(steer(nodes, sd3, sd3_dict, apply_to=apply_to), x, sigma, chunks, ctx, pooled)
    assert [not torch.equal(out[i], plain[i]) for i in range(2)] == changed
    assert safedig_hooks(sd3.model) == []


def test_step_range_limits_steering(nodes, sd3, sd3_dict):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, SD3_CFG["latent_ch"], 8, 8, generator=g)
    ctx, pooled = torch.randn(1, 5, SD3_CFG["ctx_dim"], generator=g), torch.randn(1, SD3_CFG["pooled"], generator=g)
    late = steer(nodes, sd3, sd3_dict, start_percent=0.5, end_percent=1.0)
    first, last = torch.tensor([1.0]), torch.tensor([0.5])  # schedule [1.0, 0.5, 0]: fractions 0 and 1
    assert torch.equal(_apply(late, x, first, (0,), ctx, pooled), _apply(sd3, x, first, (0,), ctx, pooled))
    assert not torch.equal(_apply(late, x, last, (0,), ctx, pooled), _apply(sd3, x, last, (0,), ctx, pooled))


def test_image_scope_latch_spans_calls_and_resets_per_run(nodes, sd3, sd3_dict):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, SD3_CFG["latent_ch"], 8, 8, generator=g)
    ctx, pooled = torch.randn(1, 5, SD3_CFG["ctx_dim"], generator=g), torch.randn(1, SD3_CFG["pooled"], generator=g)
    sigma = torch.tensor([1.0])
    model = steer(nodes, sd3, sd3_dict, gate_scope="image", override_threshold=True, threshold=1e9)
    patch = nodes.steer.steer_patches(model)[0]
    plain = _apply(sd3, x, sigma, (0,), ctx, pooled)
    assert torch.equal(_apply(model, x, sigma, (0,), ctx, pooled), plain)  # nothing passes: nothing latched
    assert patch.latched.tolist() == [False]
    patch.latched = torch.tensor([True])  # as if the image had fired at an earlier step
    assert not torch.equal(_apply(model, x, sigma, (0,), ctx, pooled), plain)
    assert patch.latched.tolist() == [True]
    assert torch.equal(sample(model, cfg=1.0), sample(sd3, cfg=1.0))  # a new run starts unlatched
    assert patch.latched.tolist() == [False]
    fires = steer(nodes, sd3, sd3_dict, gate_scope="image")
    first = sample(fires, cfg=2.0)
    assert not torch.equal(first, sample(sd3, cfg=2.0)) and torch.equal(sample(fires, cfg=2.0), first)
    assert nodes.steer.steer_patches(fires)[0].latched.tolist() == [True]
    assert safedig_hooks(sd3.model) == []


def test_exception_inside_the_model_removes_the_hooks(nodes, sd3, sd3_dict):
    steered = steer(nodes, sd3, sd3_dict)
    seen = []

    def boom(module, args, output):
        seen.append(len(safedig_hooks(sd3.model)))
        raise KeyboardInterrupt("stop")  # like ComfyUI's interrupt, raised inside the forward pass

    handle = sd3.model.diffusion_model.joint_blocks[1].x_block.mlp.register_forward_hook(boom)
    try:
        with pytest.raises(KeyboardInterrupt):
            sample(steered, cfg=1.0, steps=2)
    finally:
        handle.remove()
    assert seen and seen[0] == len(SD3_POSITIONS)  # the hooks were there while the model ran
    assert safedig_hooks(sd3.model) == []


def test_pack_mismatch_is_an_execution_error_naming_both(nodes, sd3):
    flux_dict = firing_dictionary("flux", 64, ["double.0.img.attn"])
    with pytest.raises(PackError, match=r"pack is for flux \(d_model 64\) but the model is sd3 \(d_model 128\).*Fix: "):
        steer(nodes, sd3, flux_dict)
    wide = firing_dictionary("sd3", 256, ["joint.0.img.attn"])
    with pytest.raises(PackError, match=r"d_model 256.*d_model 128"):
        steer(nodes, sd3, wide)
    deep = firing_dictionary("sd3", 128, ["joint.5.img.attn"])
    with pytest.raises(PackError, match=r"positions \['joint.5.img.attn'\] do not exist"):
        steer(nodes, sd3, deep)
    with pytest.raises(PackError, match="not routed in this pack"):
        steer(nodes, sd3, firing_dictionary("sd3", 128, SD3_POSITIONS), positions="joint.0.txt.attn")
    with pytest.raises(SafeDIGError, match=r"mode 'Sideways' is not one of \['Off', 'Blend', 'Repel', 'Both'\]"):
        steer(nodes, sd3, firing_dictionary("sd3", 128, SD3_POSITIONS), mode="Sideways")
    with pytest.raises(SafeDIGError, match=r"gate_scope 'pixel' is not one of \['token', 'image'\]"):
        steer(nodes, sd3, firing_dictionary("sd3", 128, SD3_POSITIONS), gate_scope="pixel")


def test_validate_inputs_messages(nodes):
    """One message per problem, with the node's input names, NaN caught, long lists cut to a few examples."""
    ok = dict(mode="Blend", blend_strength=1.0, repel_strength=1.0, gate="hard", override_threshold=False,
              threshold=0.0, apply_to="cond", start_percent=0.0, end_percent=1.0)

    def v(**kw):
        return nodes.Steer.validate_inputs(**{**ok, **kw})

    assert v() is True
    assert v(mode="blend!").startswith("mode 'blend!' is not one of ['Off', 'Blend', 'Repel', 'Both']")
    assert "gate_scope 'all' is not one of" in v(gate_scope="all")
    assert v(start_percent=0.8, end_percent=0.2).startswith("step range start_percent 0.8 is after end_percent 0.2")
    assert "threshold_scale 5.0 is out of range" in v(threshold_scale=5.0)
    assert v(blend_strength=float("nan")).startswith("blend_strength nan is out of range. Fix: use a value in [0, 4")
    assert v(override_threshold=True, threshold=float("inf")).startswith("threshold inf is not a finite number")
    assert v(threshold=float("nan")) is True  # ignored while override_threshold is off
    assert "tau_override" not in v(override_threshold=True, threshold=float("nan"))
    assert "'single.0.out' are listed more than once" in v(positions="single.0.out, single.0.out")
    huge = v(positions=",".join(f"nope{i}" for i in range(200_000)))
    assert "and 199995 more" in huge and len(huge) < 1000
    # Linked (unknown until execution) values pass validation.
    assert nodes.Steer.validate_inputs(*[None] * 9) is True


# ------------------------------------------------------------------------- FLUX.1-dev width, real Flux

FLUX_DEV_1_1 = dict(in_channels=16, out_channels=16, vec_in_dim=768, context_in_dim=4096, hidden_size=3072,
                    mlp_ratio=4.0, num_heads=24, depth=1, depth_single_blocks=1, axes_dim=[16, 56, 56], theta=10000,
                    patch_size=2, qkv_bias=True, guidance_embed=True)


def flux_dev_state_dict(dtype=torch.bfloat16, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights in ComfyUI's Flux layout at FLUX.1-dev width (3072, 24 heads) with 1 double + 1 single
    block: the only Flux width ComfyUI auto-detects from a file."""
    import comfy.ops
    from comfy.ldm.flux.model import Flux

    meta = Flux(**FLUX_DEV_1_1, device="meta", operations=comfy.ops.disable_weight_init)
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, p in meta.state_dict().items():
        if name.endswith(".scale"):  # RMSNorm
            sd[name] = torch.ones(p.shape, dtype=dtype)
        else:
            fan_in = p.shape[-1] if p.dim() > 1 else 1
            sd[name] = (torch.randn(p.shape, generator=g) * (1.0 / fan_in ** 0.5)).to(dtype)
    return sd


def test_flux_dev_width_through_comfyuis_own_flux_and_sampler(nodes):
    import comfy.model_base
    import comfy.sample
    import comfy.sd

    from safedig_core import resolve

    model = comfy.sd.load_diffusion_model_state_dict(flux_dev_state_dict(), model_options={"dtype": torch.bfloat16})
    assert isinstance(model.model, comfy.model_base.Flux)
    pos = resolve(model)
    assert (pos.architecture, pos.d_model, dict(pos.block_counts)) == ("flux", 3072, {"double": 1, "single": 1})
    routed = ["double.0.txt.mlp", "double.0.img.attn", "single.0.out"]
    dictionary = firing_dictionary("flux", 3072, routed, expansion=1, k=32, n_harmful=384, domains=("source",))

    g = torch.Generator().manual_seed(0)
    cond = [[torch.randn(1, 4, 4096, generator=g), {"pooled_output": torch.randn(1, 768, generator=g)}]]
    latent = torch.zeros(1, 16, 8, 8)

    def run(m):
        noise = comfy.sample.prepare_noise(latent, 3)
        return comfy.sample.sample(m, noise, 2, 1.0, "euler", "simple", cond, cond, latent, seed=3)

    base = run(model)
    steered_model = steer(nodes, model, dictionary, mode="Both", blend_strength=0.5, repel_strength=0.5)
    steered = run(steered_model)
    assert torch.isfinite(steered).all() and not torch.equal(steered, base)
    assert safedig_hooks(model.model) == []
    assert torch.equal(run(model), base)
    # cfg 1: Flux has no uncond pass, so apply_to=uncond steers nothing (bitwise).
    assert torch.equal(run(steer(nodes, model, dictionary, apply_to="uncond")), base)
    rec = nodes.steer.steer_patches(steered_model)[0].recorder
    assert rec.n_steps == 2 and rec.grid == (4, 4) and sorted(rec.steps_seen) == [0, 1]
    assert all(rec.fired_steps()[p] == [0, 1] for p in routed)


# ------------------------------------------------------------------------------- the bundled model


def write_random_bundled(folder, seed: int = 0):
    """A bundled-model checkpoint (weights + .json config, as the trainer writes them) with random weights."""
    import json

    from safetensors.torch import save_file

    from safedig_core.bundled import generator

    from tiny_models import _randomize

    cfg = generator.BundledConfig()
    model = generator.build_model(cfg, seed)
    _randomize(model, seed)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "random_bundled.safetensors"))
    (folder / "random_bundled.json").write_text(json.dumps({"model": cfg.to_dict()}))
    return model.eval(), folder / "random_bundled.safetensors"


def test_bundled_model_in_comfyuis_sampler_is_the_reference_sampler(nodes, tmp_path):
    import comfy.model_base
    import comfy.sample

    from safedig_core import resolve
    from safedig_core.bundled import generator

    ref, path = write_random_bundled(tmp_path)
    patcher = nodes.bundled_model.load_model(path)
    assert isinstance(patcher.model, comfy.model_base.Flux)
    assert type(patcher.model.diffusion_model).__module__ == "comfy.ldm.flux.model"
    cfg = generator.BundledConfig()
    g = torch.Generator().manual_seed(2)
    tok, u_tok = (torch.randn(1, cfg.context_len, cfg.text_dim, generator=g) for _ in range(2))
    pool, u_pool = (torch.randn(1, cfg.text_dim, generator=g) for _ in range(2))
    noise = generator.initial_noise([5], cfg)
    expected = generator.sample(ref, tok, pool, noise, steps=4, guidance=3.0, uncond=(u_tok, u_pool))

    def comfy_sample(model):
        latent = torch.zeros_like(noise)
        return comfy.sample.sample(model, noise.clone(), 4, 3.0, "euler", "simple", [[tok, {"pooled_output": pool}]],
                                   [[u_tok, {"pooled_output": u_pool}]], latent, seed=5)

    got = comfy_sample(patcher)
    assert torch.allclose(got, expected, atol=2e-4), (got - expected).abs().max()
    # The same Steer node steers it (width 128, FLUX position ids).
    pos = resolve(patcher)
    assert (pos.architecture, pos.d_model) == ("flux", cfg.hidden_size)
    routed = ["double.0.txt.mlp", "double.1.img.attn", "single.1.out"]
    steered_model = steer(nodes, patcher, firing_dictionary("flux", cfg.hidden_size, routed))
    steered = comfy_sample(steered_model)
    assert not torch.equal(steered, got) and torch.isfinite(steered).all()
    assert torch.equal(comfy_sample(patcher), got) and safedig_hooks(patcher.model) == []
    rec = nodes.steer.steer_patches(steered_model)[0].recorder
    assert rec.grid == (cfg.latent_size // 2, cfg.latent_size // 2) and rec.n_steps == 4
    image = nodes.bundled_io.BundledLatentToImage.execute({"samples": got}).result[0]
    assert image.shape == (1, cfg.image_size, cfg.image_size, 3) and image.min() >= 0 and image.max() <= 1
    back = generator.pixels_to_latent(image.permute(0, 3, 1, 2) * 2 - 1)  # exact inverse, up to the [0, 1] clamp
    assert torch.allclose(back, got.clamp(-1, 1), atol=1e-6)


def _shipped_weights():
    from safedig_core.bundled import generator

    return generator.GENERATOR_WEIGHTS


@pytest.mark.skipif(not _shipped_weights().exists(), reason="the shipped bundled model "
                    "(safedig_core/bundled/assets/bundled_flux.safetensors) is not built yet")
def test_shipped_bundled_model_with_the_text_encode_node_is_the_reference(nodes):
    import comfy.sample

    from safedig_core.bundled import generator
    from safedig_core.bundled.text_encoder import encode_prompts

    text = "a red circle in the center"
    ref = generator.load_bundled()
    cfg = ref.bundled_config
    noise = generator.initial_noise([11], cfg)
    expected = generator.sample(ref, *encode_prompts([text]), noise, steps=8, guidance=3.0,
                              uncond=encode_prompts([""]))
    patcher = nodes.bundled_model.LoadBundledModel.execute(weights=nodes.bundled_model.SHIPPED).result[0]
    pos = nodes.bundled_io.BundledTextEncode.execute(text=text).result[0]
    neg = nodes.bundled_io.BundledTextEncode.execute(text="").result[0]
    latent = nodes.bundled_io.BundledEmptyLatent.execute(width=cfg.image_size, height=cfg.image_size,
                                                      batch_size=1).result[0]["samples"]
    got = comfy.sample.sample(patcher, noise.clone(), 8, 3.0, "euler", "simple", pos, neg, latent, seed=11)
    assert torch.allclose(got, expected, atol=1e-3), (got - expected).abs().max()


# ------------------------------------------------------------------------------- fail closed


def bundled_patcher(nodes):
    from safedig_core.bundled import generator

    return nodes.bundled_model.load_model(generator.GENERATOR_WEIGHTS)


def bundled_sample(model, seed: int = 5):
    import comfy.sample

    g = torch.Generator().manual_seed(seed)
    cond = [[torch.randn(1, 32, 384, generator=g), {"pooled_output": torch.randn(1, 384, generator=g)}]]
    empty = [[torch.zeros(1, 32, 384), {"pooled_output": torch.zeros(1, 384)}]]
    latent = torch.zeros(1, 12, 16, 16)
    noise = comfy.sample.prepare_noise(latent, seed)
    return comfy.sample.sample(model, noise, 2, 3.0, "euler", "simple", cond, empty, latent, seed=seed)


def bypass_single_block(patcher, index: int = 0):
    """The block runs as identity: its output projection (the hooked module of single.{index}.out) is never
    called, as with a node that skips blocks or a replayed CUDA graph."""
    block = patcher.model.diffusion_model.single_blocks[index]
    block.forward = lambda img, *args, **kwargs: img


BUNDLED_ROUTED = ["double.1.img.mlp", "single.0.out"]


def test_a_bypassed_hook_stops_the_run_naming_position_model_and_comfyui(nodes):
    import comfyui_version

    from safedig_core.sampling import SteeringBypassedError

    patcher = bundled_patcher(nodes)
    bypass_single_block(patcher)
    steered = steer(nodes, patcher, firing_dictionary("flux", 128, BUNDLED_ROUTED))
    with pytest.raises(SteeringBypassedError) as err:
        bundled_sample(steered)
    message = str(err.value)
    assert "hook at single.0.out did not run" in message and "double.1.img.mlp" not in message.split("Fix:")[0]
    assert "comfy.ldm.flux.model.Flux" in message and f"ComfyUI {comfyui_version.__version__}" in message
    assert "Fix:" in message and "mode to Off" in message
    assert safedig_hooks(patcher.model) == []


def test_fail_closed_does_not_fire_for_off_disabled_or_a_closed_gate(nodes):
    bypassed = bundled_patcher(nodes)
    bypass_single_block(bypassed)
    dictionary = firing_dictionary("flux", 128, BUNDLED_ROUTED)
    base = bundled_sample(bypassed)
    for kw in (dict(enabled=False), dict(mode="Off")):
        assert torch.equal(bundled_sample(steer(nodes, bypassed, dictionary, **kw)), base), kw
    # Gate closed: every hook runs and steers nothing, so the image is bitwise the unsteered one.
    intact = bundled_patcher(nodes)
    intact_base = bundled_sample(intact)
    closed = firing_dictionary("flux", 128, BUNDLED_ROUTED, tau=1e9)
    closed_model = steer(nodes, intact, closed, mode="Both")
    assert torch.equal(bundled_sample(closed_model), intact_base)
    rec = nodes.steer.steer_patches(closed_model)[0].recorder
    assert rec.n_steps == 2 and sorted(rec.steps_seen) == [0, 1]  # the hooks did run
    # Positions that do run on the bypassed model: no error either.
    assert torch.isfinite(bundled_sample(steer(nodes, bypassed, firing_dictionary("flux", 128,
                                                                                     ["double.1.img.mlp"])))).all()


def test_load_bundled_model_lists_generators_by_their_config_not_the_judge(nodes, tmp_path):
    import shutil

    import folder_paths

    from safedig_core.bundled import generator

    _, path = write_random_bundled(tmp_path)
    # A judge checkpoint under a generator-like name: its config's content decides, not its file name.
    shutil.copy(generator.ASSETS / "judge.safetensors", tmp_path / "flux_like.safetensors")
    shutil.copy(generator.ASSETS / "judge.json", tmp_path / "flux_like.json")
    bm = nodes.bundled_model
    bm.register_folder()
    folder_paths.folder_names_and_paths[bm.FOLDER][0].append(str(tmp_path))
    try:
        names = bm.list_weights()
        assert names[0] == bm.SHIPPED and path.name in names
        assert "judge.safetensors" not in names and "flux_like.safetensors" not in names
        for name in ("judge.safetensors", "flux_like.safetensors"):
            with pytest.raises(SafeDIGError, match="is not a bundled generator"):
                bm.resolve_weights(name)
        assert "is not a bundled generator" in bm.LoadBundledModel.validate_inputs("judge.safetensors")
    finally:
        folder_paths.folder_names_and_paths[bm.FOLDER][0].remove(str(tmp_path))


def test_combine_dictionaries_node_writes_a_detect_and_steer_pack(nodes, tmp_path, monkeypatch):
    """SafeDIG Combine Dictionaries on the shipped pack with itself: single.0.out detects, input.txt steers."""
    import folder_paths

    from safedig_core.pack import USE_DETECT, USE_STEER, load_pack

    nodes.packs.register_folder()
    monkeypatch.setattr(folder_paths, "models_dir", str(tmp_path))  # the new pack goes to tmp/safedig/
    shipped = "bundled_hazard_to_toxic.safetensors"
    node = nodes.combine.CombineDictionaries
    assert "detect_positions is empty" in node.validate_inputs(shipped, " , ", shipped, "input.txt", "x")
    out = node.execute(detect_pack=shipped, detect_positions="single.0.out", steer_pack=shipped,
                       steer_positions="input.txt", pack_name="combined", overwrite=False)
    pack = load_pack(tmp_path / "safedig" / "combined.safetensors")
    assert pack.positions_that(USE_DETECT) == ["single.0.out"] and pack.positions_that(USE_STEER) == ["input.txt"]
    original = load_pack(nodes.packs.resolve_pack(shipped))
    assert pack.domain_features("toxic", "single.0.out").tau == original.domain_features("toxic", "single.0.out").tau
    assert out.result[0].pack.path == str(tmp_path / "safedig" / "combined.safetensors")
    with pytest.raises(SafeDIGError, match="already exists"):
        node.execute(detect_pack=shipped, detect_positions="single.0.out", steer_pack=shipped,
                     steer_positions="input.txt", pack_name="combined", overwrite=False)
    with pytest.raises(PackError, match="both detect and steer"):
        node.execute(detect_pack=shipped, detect_positions="input.txt", steer_pack=shipped,
                     steer_positions="input.txt", pack_name="combined", overwrite=True)


@pytest.mark.skipif(not _shipped_weights().exists(), reason="the shipped bundled model is not built yet")
def test_a_late_latch_restarts_the_run_inside_comfyuis_sampler(nodes):
    """The Steer node's OUTER_SAMPLE wrapper samples a run again when the shipped pack's gate latched an
    image after the first step. ComfyUI's sampler must reproduce a run when called twice: the restarted
    output equals, bit for bit, one run of a Steer node whose latch is open from the start."""
    import comfy.sample

    from safedig_core import ALL_DOMAINS, load_pack
    from safedig_core.bundled import world

    patcher = bundled_patcher(nodes)
    dictionary = SteeringDictionary(load_pack(ROOT / "dictionaries" / "bundled_hazard_to_toxic.safetensors"),
                                    ALL_DOMAINS)
    neg = nodes.bundled_io.BundledTextEncode.execute(text="").result[0]
    latent = torch.zeros(1, 12, 16, 16)

    def run(model, pos, seed):
        return comfy.sample.sample(model, comfy.sample.prepare_noise(latent, seed), 10, 3.0, "euler", "simple", pos,
                                   neg, latent, seed=seed)

    for i, prompt in enumerate(world.eval_prompts(4, "heldout", seed=0, concepts=["venom", "blight"])):
        pos = nodes.bundled_io.BundledTextEncode.execute(text=prompt.text).result[0]
        restarting = steer(nodes, patcher, dictionary, gate_scope="image")
        out = run(restarting, pos, i)
        patch = nodes.steer.steer_patches(restarting)[0]
        if patch.restarted is not None:
            break
    else:
        pytest.fail("no held-out target prompt latched after the first step")
    from_start = steer(nodes, patcher, dictionary, gate_scope="image")
    ref = nodes.steer.steer_patches(from_start)[0]
    ref.restart_late_latches = False
    begin = ref.begin_run
    ref.begin_run = lambda sigmas, n_images, latched=None: begin(sigmas, n_images, torch.ones(n_images, dtype=bool))
    assert torch.equal(out, run(from_start, pos, i))
    single = steer(nodes, patcher, dictionary, gate_scope="image")
    nodes.steer.steer_patches(single)[0].restart_late_latches = False
    assert not torch.equal(out, run(single, pos, i))  # without the restart the image differs
    assert safedig_hooks(patcher.model) == []


@pytest.mark.skipif(not _shipped_weights().exists(), reason="the shipped bundled model is not built yet")
def test_only_the_images_that_latched_late_are_sampled_again_inside_comfyuis_sampler(nodes):
    """A batch of four images of one prompt in ComfyUI's sampler: the images whose gate latched after the first
    step are sampled again as a batch of their own (their rows of the noise), latched from the start; the
    others keep the first run's output bit for bit. Conditioning with one entry per image cannot be cut: then
    the whole batch is sampled again."""
    import comfy.sample
    import comfy.samplers

    from safedig_core import ALL_DOMAINS, load_pack
    from safedig_core.bundled import world

    patcher = bundled_patcher(nodes)
    dictionary = SteeringDictionary(load_pack(ROOT / "dictionaries" / "bundled_hazard_to_toxic.safetensors"),
                                    ALL_DOMAINS)
    neg = nodes.bundled_io.BundledTextEncode.execute(text="").result[0]
    latent = torch.zeros(4, 12, 16, 16)

    def run(model, pos, seed, rows=slice(None)):
        noise = comfy.sample.prepare_noise(latent, seed)[rows]
        return comfy.sample.sample(model, noise, 10, 3.0, "euler", "simple", pos, neg, latent[rows], seed=seed)

    for i, prompt in enumerate(world.eval_prompts(6, "heldout", seed=1, concepts=["venom", "blight", "ember"])):
        pos = nodes.bundled_io.BundledTextEncode.execute(text=prompt.text).result[0]
        restarting = steer(nodes, patcher, dictionary, gate_scope="image")
        out = run(restarting, pos, i)
        late = nodes.steer.steer_patches(restarting)[0].restarted
        if late is not None and not late.all():
            break
    else:
        pytest.fail("no held-out prompt had some, not all, of four images latch after the first step")
    once = steer(nodes, patcher, dictionary, gate_scope="image")
    nodes.steer.steer_patches(once)[0].restart_late_latches = False
    assert torch.equal(out[~late], run(once, pos, i)[~late])
    from_start = steer(nodes, patcher, dictionary, gate_scope="image")
    ref = nodes.steer.steer_patches(from_start)[0]
    ref.restart_late_latches = False
    begin = ref.begin_run
    ref.begin_run = lambda sigmas, n_images, latched=None: begin(sigmas, n_images, torch.ones(n_images, dtype=bool))
    assert torch.equal(out[late], run(from_start, pos, i, late))
    guider = comfy.samplers.CFGGuider(patcher)
    guider.set_conds(pos, neg)
    assert nodes.steer.batch_cuttable(guider, 4, None, [latent.shape])
    per_image = [[c.repeat(4, 1, 1), {k: v.repeat(4, 1) if isinstance(v, torch.Tensor) else v for k, v in d.items()}]
                 for c, d in pos]
    guider.set_conds(per_image, neg)
    assert not nodes.steer.batch_cuttable(guider, 4, None, [latent.shape])  # one prompt per image
    whole = steer(nodes, patcher, dictionary, gate_scope="image")
    out_whole = run(whole, per_image, i)  # the whole batch sampled again; the late images' rows taken from it
    assert torch.equal(nodes.steer.steer_patches(whole)[0].restarted, late)
    assert torch.equal(nodes.steer.steer_patches(whole)[0].late, late)
    assert nodes.steer.steer_patches(whole)[0].recorder.sampled_again == late.nonzero().flatten().tolist()
    from_start_whole = steer(nodes, patcher, dictionary, gate_scope="image")
    ref = nodes.steer.steer_patches(from_start_whole)[0]
    ref.restart_late_latches = False
    begin_whole = ref.begin_run
    ref.begin_run = lambda sigmas, n_images, latched=None: begin_whole(sigmas, n_images, late)
    assert torch.equal(out_whole[late], run(from_start_whole, per_image, i)[late])
    assert torch.equal(out_whole[~late], out[~late])
    assert not nodes.steer.batch_cuttable(guider, 4, None, [latent.shape, latent.shape])  # a nested latent pack
    assert safedig_hooks(patcher.model) == []
