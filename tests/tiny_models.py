"""The same tiny random weights in diffusers' and ComfyUI's FLUX / SD3 classes, with matched inputs."""

from __future__ import annotations

import torch

from comfy_env import ROOT, import_comfy

FLUX_CFG = dict(hidden=64, heads=4, double=2, single=2, latent_ch=4, ctx_dim=32, vec_dim=24, axes=(4, 6, 6))
SD3_CFG = dict(depth=2, heads=2, head_dim=64, latent_ch=16, ctx_dim=40, pooled=24, patch=2, sample=16)


def diffusers_flux(seed: int = 0, dtype=torch.float32):
    from diffusers import FluxTransformer2DModel

    c = FLUX_CFG
    torch.manual_seed(seed)
    model = FluxTransformer2DModel(
        patch_size=1, in_channels=c["latent_ch"] * 4, num_layers=c["double"], num_single_layers=c["single"],
        attention_head_dim=c["hidden"] // c["heads"], num_attention_heads=c["heads"],
        joint_attention_dim=c["ctx_dim"], pooled_projection_dim=c["vec_dim"], guidance_embeds=False,
        axes_dims_rope=c["axes"],
    )
    _randomize(model, seed)
    return (model if dtype == torch.float32 else model.to(dtype)).eval()


def comfy_flux_from(diffusers_model, dtype=torch.float32):
    """ComfyUI's own Flux class with the diffusers weights, converted by ComfyUI's own key map."""
    import_comfy()
    import comfy.model_detection
    import comfy.ops
    from comfy.ldm.flux.model import Flux

    c = FLUX_CFG
    params = nodes_compat().flux_params(dict(
        in_channels=c["latent_ch"], out_channels=c["latent_ch"], vec_in_dim=c["vec_dim"],
        context_in_dim=c["ctx_dim"], hidden_size=c["hidden"], mlp_ratio=4.0, num_heads=c["heads"],
        depth=c["double"], depth_single_blocks=c["single"], axes_dim=list(c["axes"]), theta=10000,
        patch_size=2, qkv_bias=True, guidance_embed=False))
    model = Flux(**params, operations=comfy.ops.disable_weight_init, dtype=dtype)
    sd = {k: v.clone() for k, v in diffusers_model.state_dict().items()}
    converted = comfy.model_detection.convert_diffusers_mmdit(sd, "")
    missing, unexpected = model.load_state_dict(converted, strict=False)
    assert not unexpected and not missing, (missing, unexpected)
    return (model if dtype == torch.float32 else model.to(dtype)).eval()


def nodes_compat():
    """SafeDIG's nodes/compat.py, loaded by path: on sys.path, `nodes` is ComfyUI's own nodes.py."""
    import importlib.util
    import sys

    name = "safedig_nodes_compat"
    if name not in sys.modules:
        import_comfy()
        spec = importlib.util.spec_from_file_location(name, ROOT / "nodes" / "compat.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def flux_inputs(batch: int = 2, h: int = 8, w: int = 8, txt: int = 6, seed: int = 1, dtype=torch.float32):
    """(comfy kwargs, diffusers kwargs) describing the same call: latent [B, C, H, W] in ComfyUI, the
    2x2-packed tokens and position ids in diffusers."""
    c = FLUX_CFG
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, c["latent_ch"], h, w, generator=g).to(dtype)
    ctx = torch.randn(batch, txt, c["ctx_dim"], generator=g).to(dtype)
    vec = torch.randn(batch, c["vec_dim"], generator=g).to(dtype)
    t = torch.full((batch,), 0.6, dtype=dtype)
    packed = x.view(batch, c["latent_ch"], h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    packed = packed.reshape(batch, (h // 2) * (w // 2), c["latent_ch"] * 4)
    img_ids = torch.zeros(h // 2, w // 2, 3)
    img_ids[..., 1] = torch.arange(h // 2)[:, None]
    img_ids[..., 2] = torch.arange(w // 2)[None, :]
    comfy_kw = dict(x=x, timestep=t, context=ctx, y=vec)
    diff_kw = dict(hidden_states=packed, encoder_hidden_states=ctx, pooled_projections=vec, timestep=t,
                   img_ids=img_ids.reshape(-1, 3).to(dtype), txt_ids=torch.zeros(txt, 3, dtype=dtype),
                   return_dict=False)
    return comfy_kw, diff_kw


def diffusers_sd3(seed: int = 0, dtype=torch.float32):
    from diffusers import SD3Transformer2DModel

    c = SD3_CFG
    torch.manual_seed(seed)
    model = SD3Transformer2DModel(
        sample_size=c["sample"], patch_size=c["patch"], in_channels=c["latent_ch"], num_layers=c["depth"],
        attention_head_dim=c["head_dim"], num_attention_heads=c["heads"], joint_attention_dim=c["ctx_dim"],
        caption_projection_dim=c["head_dim"] * c["heads"], pooled_projection_dim=c["pooled"],
        out_channels=c["latent_ch"], pos_embed_max_size=c["sample"] // c["patch"] * 2,
    )
    _randomize(model, seed)
    return (model if dtype == torch.float32 else model.to(dtype)).eval()


def comfy_sd3_from(diffusers_model, dtype=torch.float32):
    """ComfyUI's MMDiT, built by ComfyUI's own loader from the diffusers-layout state dict (it detects
    SD3 by 16 latent channels and derives depth = width / 64, so the tiny config keeps both)."""
    import_comfy()
    import comfy.sd

    sd = {k: v.clone() for k, v in diffusers_model.state_dict().items()}
    patcher = comfy.sd.load_diffusion_model_state_dict(sd, model_options={"dtype": dtype})
    assert patcher is not None, "ComfyUI did not detect the tiny SD3 state dict"
    return patcher


def sd3_inputs(batch: int = 2, txt: int = 5, seed: int = 1, dtype=torch.float32):
    c = SD3_CFG
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, c["latent_ch"], c["sample"], c["sample"], generator=g).to(dtype)
    ctx = torch.randn(batch, txt, c["ctx_dim"], generator=g).to(dtype)
    pooled = torch.randn(batch, c["pooled"], generator=g).to(dtype)
    t = torch.full((batch,), 0.6, dtype=dtype)
    comfy_kw = dict(x=x, timesteps=t * 1000, context=ctx, y=pooled)
    diff_kw = dict(hidden_states=x, encoder_hidden_states=ctx, pooled_projections=pooled, timestep=t * 1000,
                   return_dict=False)
    return comfy_kw, diff_kw


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """diffusers zero-initialises gates and output layers; random values make every position matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.5 / max(1, p.shape[-1]) ** 0.5))
