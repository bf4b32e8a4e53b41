"""nodes/compat.py: the one home of what differs between ComfyUI versions, against the real ComfyUI and against
FluxParams-like dataclasses of the older and the newer constructor."""

from __future__ import annotations

import dataclasses
import logging
import os

import pytest
import torch

from safedig_core.errors import SafeDIGError

from comfy_env import import_comfy
from tiny_models import FLUX_CFG, comfy_flux_from, diffusers_flux, flux_inputs, nodes_compat

pytestmark = pytest.mark.comfy_inprocess


@dataclasses.dataclass
class OldFluxParams:  # the 0.3.75 layout: no txt_ids_dims
    in_channels: int
    hidden_size: int
    guidance_embed: bool
    mlp_silu_act: bool = False


@dataclasses.dataclass
class NewFluxParams:  # the newer layout: txt_ids_dims is required
    in_channels: int
    hidden_size: int
    guidance_embed: bool
    txt_ids_dims: list
    mlp_silu_act: bool = False


@dataclasses.dataclass
class FutureFluxParams:
    in_channels: int
    rope_layout: str


FLUX1 = dict(in_channels=4, hidden_size=64, guidance_embed=False, txt_ids_dims=[])


@pytest.fixture(scope="module")
def compat():
    return nodes_compat()


def test_flux_params_fit_both_constructors(compat):
    old = compat.flux_params(FLUX1, OldFluxParams)
    assert old == dict(in_channels=4, hidden_size=64, guidance_embed=False)
    assert OldFluxParams(**old).hidden_size == 64
    values = {k: v for k, v in FLUX1.items() if k != "txt_ids_dims"}
    new = compat.flux_params(values, NewFluxParams)
    assert new["txt_ids_dims"] == [] and NewFluxParams(**new).txt_ids_dims == []
    with pytest.raises(TypeError):
        NewFluxParams(**old)  # what the loader did before: the newer constructor refuses it


def test_an_unknown_required_flux_field_is_a_clear_error(compat):
    expected = r"^ComfyUI \S+'s FluxParams requires a field 'rope_layout'.*tested on \(0\.3\.52 to 0\.3\.75"
    with pytest.raises(SafeDIGError, match=expected):
        compat.flux_params(FLUX1, FutureFluxParams)


def test_real_flux_params_build_comfyuis_flux_with_the_same_output():
    import_comfy()
    from comfy.ldm.flux.model import FluxParams

    ref = diffusers_flux()
    model = comfy_flux_from(ref)  # built through compat.flux_params
    assert {f.name for f in dataclasses.fields(FluxParams)} >= set(vars(model.params))
    comfy_kw, diff_kw = flux_inputs()
    with torch.no_grad():
        ours = model(**comfy_kw)
        theirs = ref(**diff_kw)[0]
    c = FLUX_CFG
    b, _, h, w = comfy_kw["x"].shape
    unpacked = theirs.view(b, h // 2, w // 2, c["latent_ch"], 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(ours.shape)
    torch.testing.assert_close(ours, unpacked, rtol=1e-4, atol=1e-4)


def test_api_resolution_takes_the_newest_supported_version(compat):
    import_comfy()
    api = compat.resolve_api()
    assert api is compat.API and all(hasattr(api, n) for n in compat.API_NAMES)
    assert compat.resolve_api(("v9_9_9", "v0_0_2")).__name__ == "comfy_api.v0_0_2"
    assert compat.resolve_api(("v9_9_9",)) is None


def test_the_comfyui_under_test_is_the_one_the_test_command_asked_for(compat):
    """scripts/test.sh's second pass sets SAFEDIG_EXPECT_COMFYUI, so it cannot pass on the wrong ComfyUI."""
    import_comfy()
    expected = os.environ.get("SAFEDIG_EXPECT_COMFYUI")
    assert compat.comfyui_version() == (expected or compat.comfyui_version()) != "unknown"
    assert tuple(map(int, compat.comfyui_version().split("."))) >= tuple(map(int, compat.MINIMUM_COMFYUI.split(".")))


def test_no_supported_api_is_one_clear_line(compat):
    message = compat.missing_api_message(("v9_9_9",))
    assert "nodes not loaded" in message and "comfy_api.v9_9_9" in message
    assert f"ComfyUI {compat.comfyui_version()}" in message and compat.MINIMUM_COMFYUI in message
    assert compat.comfyui_version() != "unknown"


def test_host_label_names_the_running_comfyui(compat, caplog):
    import_comfy()
    import comfyui_version

    assert compat.host_label() == f"ComfyUI {comfyui_version.__version__}"
    with caplog.at_level(logging.ERROR):
        assert compat._load_api() is compat.API  # a supported API: nothing logged
    assert not caplog.records
