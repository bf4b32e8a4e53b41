"""Position registry: ids derived from the model for every backend, also at FLUX.1 Dev / SD3.5 Large depth."""

import pytest
import torch
from torch import nn

from safedig_core.errors import ArchitectureError
from safedig_core.positions import ARCHITECTURES, PositionParts, positions_from_state_dict, reference_ids, resolve

from tiny_models import comfy_flux_from, comfy_sd3_from, diffusers_flux, diffusers_sd3


def test_flux_backends_agree_on_ids_and_width():
    d = diffusers_flux()
    c = comfy_flux_from(d)
    pd, pc = resolve(d), resolve(c)
    assert pd.ids == pc.ids == reference_ids("flux", 2, 2)
    assert (pd.architecture, pd.d_model, pd.backend.name) == ("flux", 64, "diffusers.flux")
    assert (pc.architecture, pc.d_model, pc.backend.name) == ("flux", 64, "comfy.flux")
    assert pc.modules["double.1.img.attn"] is c.double_blocks[1].img_attn.proj
    assert pd.modules["single.0.out"] is d.single_transformer_blocks[0].proj_out


def test_flux_input_projections_in_both_backends():
    d = diffusers_flux()
    c = comfy_flux_from(d)
    pd, pc = resolve(d), resolve(c)
    assert pd.input_ids == pc.input_ids == ("input.txt",)
    assert next(iter(pd.modules)) == next(iter(pc.modules)) == "input.txt"  # canonical order: inputs, blocks
    assert "input.txt" not in pd.ids  # the block positions
    assert pd.candidates == pc.candidates == ["input.txt", *pd.ids]  # collection's and routing's default
    assert pc.modules["input.txt"] is c.txt_in and pd.modules["input.txt"] is d.context_embedder
    assert pc.pooled["input.vec"] is c.vector_in
    assert pd.pooled["input.vec"] is d.time_text_embed.text_embedder


def test_sd3_input_projections_in_both_backends():
    d = diffusers_sd3()
    c = comfy_sd3_from(d).model.diffusion_model
    pd, pc = resolve(d), resolve(c)
    assert pd.input_ids == pc.input_ids == ("input.txt",)
    assert pc.modules["input.txt"] is c.context_embedder and pd.modules["input.txt"] is d.context_embedder
    assert pc.pooled["input.vec"] is c.y_embedder
    assert pd.pooled["input.vec"] is d.time_text_embed.text_embedder
    # An MMDiT without a text projection (ComfyUI holds an Identity there) has no input.txt position.
    c.context_embedder = nn.Identity()
    assert resolve(c).input_ids == () and "input.txt" not in resolve(c).modules
    c.y_embedder = None
    assert dict(resolve(c).pooled) == {}


@pytest.mark.parametrize("arch", ["flux", "sd3"])
def test_input_txt_is_a_position_id_and_input_vec_is_not(arch):
    pattern = ARCHITECTURES[arch].id_pattern
    assert pattern.match("input.txt")
    assert not pattern.match("input.vec") and not pattern.match("input.img") and not pattern.match("input.txt.x")


def test_sd3_last_block_has_no_text_outputs_in_both_backends():
    d = diffusers_sd3()
    patcher = comfy_sd3_from(d)
    ids = ["joint.0.img.attn", "joint.0.txt.attn", "joint.0.img.mlp", "joint.0.txt.mlp",
           "joint.1.img.attn", "joint.1.img.mlp"]
    assert resolve(d).ids == ids
    # A ModelPatcher (what ComfyUI nodes receive) unwraps to the same DiT.
    assert resolve(patcher).ids == ids
    assert resolve(patcher).backend.name == "comfy.mmdit"
    assert reference_ids("sd3", 2) == ids


def test_flux_dev_depth_derived_from_model():
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):  # the real FLUX.1 Dev config, no memory allocated
        model = FluxTransformer2DModel(num_layers=19, num_single_layers=38, guidance_embeds=True)
    p = resolve(model)
    assert p.d_model == 3072
    assert dict(p.block_counts) == {"double": 19, "single": 38}
    assert len(p.ids) == 19 * 4 + 38
    assert p.ids == reference_ids("flux", 19, 38)
    assert p.input_ids == ("input.txt",) and p.modules["input.txt"].out_features == 3072
    assert p.pooled["input.vec"].linear_2.out_features == 3072  # guidance-distilled: still the pooled part


def test_sd35_large_depth_derived_from_model():
    from diffusers import SD3Transformer2DModel

    with torch.device("meta"):  # SD3.5 Large: 38 joint blocks, 38 heads x 64
        model = SD3Transformer2DModel(num_layers=38, num_attention_heads=38, attention_head_dim=64,
                                      caption_projection_dim=2432, in_channels=16, out_channels=16,
                                      pos_embed_max_size=192, sample_size=128)
    p = resolve(model)
    assert p.d_model == 2432
    assert len(p.ids) == 37 * 4 + 2
    assert "joint.37.txt.mlp" not in p.modules and "joint.37.img.mlp" in p.modules
    assert p.input_ids == ("input.txt",) and p.modules["input.txt"].out_features == 2432


def test_unknown_model_is_named_in_the_error():
    class Unet(nn.Module):
        def __init__(self):
            super().__init__()
            self.down = nn.Linear(2, 2)

    with pytest.raises(ArchitectureError, match=r"unsupported model: found .*Unet with children \['down'\]"):
        resolve(Unet())


def test_positions_from_state_dict_layouts():
    d = diffusers_flux()
    shapes = {k: list(v.shape) for k, v in d.state_dict().items()}
    assert positions_from_state_dict(shapes) == ("flux", "diffusers.flux", 64, reference_ids("flux", 2, 2))
    c = comfy_flux_from(d)
    prefixed = {f"model.diffusion_model.{k}": list(v.shape) for k, v in c.state_dict().items()}
    assert positions_from_state_dict(prefixed) == ("flux", "comfy.flux", 64, reference_ids("flux", 2, 2))
    sd3 = {k: list(v.shape) for k, v in diffusers_sd3().state_dict().items()}
    assert positions_from_state_dict(sd3)[::2] == ("sd3", 128)
    with pytest.raises(ArchitectureError, match=r"no FLUX\.1 or SD3/MMDiT transformer blocks"):
        positions_from_state_dict({"conv.weight": [3, 3]})


@pytest.mark.parametrize("pid,parts", [
    ("double.3.txt.mlp", ("double", 3, "txt", "mlp")),
    ("single.10.out", ("single", 10, "both", "out")),
    ("joint.0.img.attn", ("joint", 0, "img", "attn")),
    ("input.txt", ("input", 0, "txt", "proj")),
])
def test_position_parts(pid, parts):
    p = PositionParts.parse(pid)
    assert (p.block, p.index, p.stream, p.site) == parts


def test_malformed_position_id():
    with pytest.raises(ArchitectureError, match="malformed position id"):
        PositionParts.parse("double.x")
