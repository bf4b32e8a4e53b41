"""The Steer node's checks and setup in the core (safedig_core.steer_inputs), without a ComfyUI server; and
the bundled generator lookup the Load Bundled Model node uses."""

from __future__ import annotations

import json
import math

import pytest

from safedig_core import PackError, SafeDIGError, SteeringDictionary, load_pack, resolve, save_pack
from safedig_core.bundled import generator
from safedig_core.steer_inputs import dictionary_for_run, first_problem, node_params, require_dictionary
from safedig_core.synthetic import random_pack

from tiny_models import diffusers_flux


def _values(**override):
    base = dict(mode="Blend", blend_strength=1.0, repel_strength=1.0, gate="hard", override_threshold=False,
                threshold=0.0, apply_to="cond", start_percent=0.0, end_percent=1.0, threshold_scale=1.0,
                gate_scope="image")
    base.update(override)
    return base


def _problem(positions="", **override):
    v = _values(**override)
    choices = {k: v[k] for k in ("mode", "gate", "apply_to", "gate_scope")}
    return first_problem(choices, node_params(**v), positions)


def test_good_values_have_no_problem():
    assert _problem() is None


@pytest.mark.parametrize("override, says", [
    (dict(mode="Blnd"), "mode 'Blnd' is not one of"),
    (dict(blend_strength=math.nan), "blend_strength nan is out of range"),
    (dict(repel_strength=9.0), "repel_strength 9.0 is out of range"),
    (dict(override_threshold=True, threshold=math.inf), "threshold inf is not a finite number"),
    (dict(threshold_scale=-1.0), "threshold_scale -1.0 is out of range"),
    (dict(start_percent=0.8, end_percent=0.2), "start_percent 0.8 is after end_percent 0.2"),
    (dict(positions="single.0.out, single.0.out"), "listed more than once"),
    (dict(positions="block.7"), "are not position ids"),
])
def test_each_bad_value_names_the_node_input(override, says):
    problem = _problem(**override)
    assert problem is not None and says in str(problem)
    assert "tau_" not in str(problem)  # never an internal field name


def test_a_linked_value_is_not_checked_at_validation():
    values = node_params(None, None, 1.0, None, False, 0.0, None, 0.0, 1.0, None, None)
    assert "blend_strength" not in values and "mode" not in values
    assert first_problem({"mode": None}, values, None) is None


@pytest.fixture
def flux_pack(tmp_path):
    model = diffusers_flux()
    ids = resolve(model).ids
    meta, tensors = random_pack("flux", model.inner_dim, [*ids[:2], "single.50.out"])  # a block it lacks
    path = tmp_path / "p.safetensors"
    save_pack(path, meta, tensors)
    return model, load_pack(path), ids


def test_dictionary_for_run_cuts_to_listed_positions(flux_pack):
    model, pack, ids = flux_pack
    whole = SteeringDictionary(pack, "target")
    cut = dictionary_for_run(whole, ids[1], resolve(model))
    assert cut.positions == [ids[1]] and whole.positions == [*ids[:2], "single.50.out"]


def test_dictionary_for_run_names_the_pack_when_it_does_not_fit(flux_pack):
    model, pack, _ = flux_pack
    with pytest.raises(PackError, match=r"\(pack p\.safetensors\)"):
        dictionary_for_run(SteeringDictionary(pack, "target"), "single.50.out", resolve(model))


def test_require_dictionary_refuses_other_types():
    with pytest.raises(SafeDIGError, match="is a dict, not a SafeDIG dictionary"):
        require_dictionary({})


def test_find_generator(tmp_path):
    assert generator.find_generator(generator.GENERATOR_WEIGHTS.name, [generator.ASSETS], "x") == \
        generator.GENERATOR_WEIGHTS
    (tmp_path / "judge.safetensors").write_bytes(b"")
    (tmp_path / "judge.json").write_text(json.dumps({"judge": {}}))
    with pytest.raises(SafeDIGError, match="is not a bundled generator"):
        generator.find_generator("judge.safetensors", [tmp_path], "x")
    with pytest.raises(SafeDIGError, match="must be a plain file name"):
        generator.find_generator("../judge.safetensors", [tmp_path], "x")
    with pytest.raises(SafeDIGError, match="not found; searched"):
        generator.find_generator("none.safetensors", [tmp_path], "x")
