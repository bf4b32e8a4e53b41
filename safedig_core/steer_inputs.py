"""The Steer node's values as the core sees them: its choices, the names users see, the one check that
validate_inputs and execute share, and the dictionary a run steers with. No ComfyUI here, so tests reach
every message without a server.
"""

from __future__ import annotations

import os
from typing import Any

from .errors import PackError, SafeDIGError
from .hooks import SteeringDictionary
from .positions import ARCHITECTURES, ModelPositions
from .steering_math import param_problems, parse_positions

MODES = ["Off", "Blend", "Repel", "Both"]
GATES = ["hard", "soft"]
SCOPES = ["token", "image"]
APPLY_TO = ["cond", "uncond", "both"]
CHOICES = {"mode": MODES, "gate": GATES, "apply_to": APPLY_TO, "gate_scope": SCOPES}
# SteeringParams field -> the node input a user sees (messages never name internal fields).
INPUT_NAMES = {"tau_override": "threshold", "tau_scale": "threshold_scale", "start": "start_percent",
               "end": "end_percent", "scope": "gate_scope"}
ID_PATTERNS = [a.id_pattern for a in ARCHITECTURES.values()]


def node_params(mode, blend_strength, repel_strength, gate, override_threshold, threshold, apply_to, start_percent,
                end_percent, threshold_scale, gate_scope) -> dict[str, Any]:
    """SteeringParams fields from node values; None (a linked input, unknown at validation) is left out."""
    values = dict(mode=mode, blend_strength=blend_strength, repel_strength=repel_strength, gate=gate,
                  tau_override=threshold if override_threshold else None, tau_scale=threshold_scale,
                  scope=gate_scope, apply_to=apply_to, start=start_percent, end=end_percent)
    return {k: v for k, v in values.items() if v is not None or k == "tau_override"}


def first_problem(choices: dict[str, Any], values: dict[str, Any], positions: Any) -> SafeDIGError | None:
    """The first problem with the node's values (each reported once, with its fix), or None. `choices` are
    the combo values by input name (None: linked); `values` come from node_params."""
    problems = [SafeDIGError(f"{name} {value!r} is not one of {CHOICES[name]}", f"pick one of {CHOICES[name]}")
                for name, value in choices.items() if value is not None and value not in CHOICES[name]]
    problems += param_problems(values, INPUT_NAMES)
    try:
        parse_positions(positions, ID_PATTERNS)
    except SafeDIGError as exc:
        problems.append(exc)
    return problems[0] if problems else None


def require_dictionary(dictionary: Any) -> SteeringDictionary:
    """The dictionary input, or a clear error for anything else linked to it (checked even when disabled)."""
    if not isinstance(dictionary, SteeringDictionary):
        raise SafeDIGError(f"the dictionary input is a {type(dictionary).__name__}, not a SafeDIG dictionary",
                           "connect a SafeDIG Load Dictionary node")
    return dictionary


def dictionary_for_run(dictionary: SteeringDictionary, positions: Any,
                       model_positions: ModelPositions) -> SteeringDictionary:
    """The dictionary a Steer run uses (the input, as require_dictionary returned it), cut to the listed
    positions and checked against the model's positions; errors name the pack file."""
    subset = parse_positions(positions, ID_PATTERNS)
    if subset is not None:
        dictionary = SteeringDictionary(dictionary.pack, dictionary.requested, subset)
    try:
        dictionary.pack.check_compatible(model_positions, dictionary.positions)
    except PackError as exc:
        raise PackError(exc.problem + f" (pack {pack_name(dictionary)})", exc.fix, path=exc.path) from None
    return dictionary


def pack_name(dictionary: SteeringDictionary) -> str:
    return os.path.basename(dictionary.pack.path)
