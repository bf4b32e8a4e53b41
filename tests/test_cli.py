"""`python -m safedig_core`: positions and inspect, and the core importing no ComfyUI module."""

import json
import subprocess
import sys

from safetensors.torch import save_file

from safedig_core import save_pack
from safedig_core.cli import main
from safedig_core.synthetic import random_pack

from tiny_models import diffusers_flux


def test_positions_for_reference_models(capsys):
    assert main(["positions", "flux-dev", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["positions"]) == 19 * 4 + 38 and out["positions"][-1] == "single.37.out"
    assert main(["positions", "sd3:38"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "# sd3:38: 150 positions" and lines[-1] == "joint.37.img.mlp"


def test_positions_of_a_model_file(tmp_path, capsys):
    path = tmp_path / "tiny_flux.safetensors"
    save_file({k: v.contiguous() for k, v in diffusers_flux().state_dict().items()}, str(path))
    assert main(["positions", str(path)]) == 0
    out = capsys.readouterr().out
    assert "flux via diffusers.flux layout (d_model 64): 10 positions" in out
    assert "single.1.out" in out


def test_positions_bad_target(capsys):
    assert main(["positions", "unet:3"]) == 2
    assert "unknown architecture 'unet'" in capsys.readouterr().err


def test_inspect_shows_metadata_and_routing_table(tmp_path, capsys):
    path = save_pack(tmp_path / "p.safetensors", *random_pack("flux", 16, ["double.0.img.attn", "single.0.out"]))
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "architecture flux, d_model 16" in out
    assert "Routing table (2 candidates" in out and "single.0.out" in out
    assert main(["inspect", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["domains"]["target"]["adapted_from"] == "source"


def test_inspect_bad_pack_exits_2_with_message(tmp_path, capsys):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x01")
    assert main(["inspect", str(bad)]) == 2
    assert "bad.safetensors: file is truncated" in capsys.readouterr().err


def test_core_imports_no_comfyui_module():
    code = ("import safedig_core, safedig_core.cli, sys; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('comfy', 'comfy_api', 'nodes', 'folder_paths')]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
    run = subprocess.run([sys.executable, "-m", "safedig_core", "positions", "flux:1:1"], capture_output=True,
                         text=True, check=True)
    assert run.stdout.splitlines()[1:] == ["double.0.img.attn", "double.0.txt.attn", "double.0.img.mlp",
                                           "double.0.txt.mlp", "single.0.out"]
