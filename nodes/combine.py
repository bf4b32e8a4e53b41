"""SafeDIG Combine Dictionaries: one pack from two, one pack's gate detecting and the other's Blend steering
(safedig_core/combine.py; docs/method.md section 6). Writes into models/safedig/ like Build Dictionary."""

from __future__ import annotations

from safedig_core import ALL_DOMAINS, SteeringDictionary, load_pack
from safedig_core.combine import combine_packs
from safedig_core.errors import SafeDIGError
from safedig_core.pack_info import format_pack

from . import packs
from .build import pack_outputs, pack_path, position_list
from .compat import io


def _check_positions(detect_positions, steer_positions) -> None:
    for name, positions, example in (("detect_positions", detect_positions, "single.0.out"),
                                     ("steer_positions", steer_positions, "input.txt")):
        if positions is not None and not position_list(positions):
            raise SafeDIGError(f"{name} is empty", f"list the position ids, e.g. {example}")


class CombineDictionaries(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SafeDIGCombineDictionaries",
            display_name="SafeDIG Combine Dictionaries",
            category="SafeDIG/build",
            description="One pack from two packs of the same model and risk domains: the first pack's gate "
                        "detects at its positions (they edit nothing), the second pack's Blend steers at its "
                        "positions the images the detector latched (their own gate never opens). For a "
                        "position that holds on new wordings but breaks images when steered, and one that "
                        "redraws well but fires on benign prompts. Needs the image-scope gate in Steer.",
            inputs=[
                io.Combo.Input("detect_pack", options=packs.list_packs(), tooltip="The pack whose gate detects."),
                io.String.Input("detect_positions", default="single.0.out",
                                tooltip="Comma-separated positions of detect_pack that detect."),
                io.Combo.Input("steer_pack", options=packs.list_packs(), tooltip="The pack whose Blend steers."),
                io.String.Input("steer_positions", default="input.txt",
                                tooltip="Comma-separated positions of steer_pack that steer."),
                io.String.Input("pack_name", default="my_combined_pack", tooltip="File name in models/safedig/."),
                io.Boolean.Input("overwrite", default=False, tooltip="Replace an existing pack of that name."),
            ],
            outputs=pack_outputs(),
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(cls, detect_pack, detect_positions, steer_pack, steer_positions, pack_name) -> bool | str:
        try:  # a linked value arrives as None and is checked when the node runs
            _check_positions(detect_positions, steer_positions)
            for pack in (detect_pack, steer_pack):
                if pack is not None:
                    packs.pack_summary(packs.resolve_pack(pack))  # the header pass: a bad pack is an HTTP 400
            if pack_name is not None:
                pack_path(pack_name)
        except SafeDIGError as exc:
            return str(exc)
        return True

    @classmethod
    def execute(cls, detect_pack, detect_positions, steer_pack, steer_positions, pack_name,
                overwrite) -> io.NodeOutput:
        _check_positions(detect_positions, steer_positions)
        out = pack_path(pack_name)
        if out.exists() and not overwrite:
            raise SafeDIGError(f"pack {out.name} already exists in models/safedig/",
                               "choose another pack_name, or switch overwrite on")
        path = combine_packs(load_pack(packs.resolve_pack(detect_pack)), position_list(detect_positions),
                             load_pack(packs.resolve_pack(steer_pack)), position_list(steer_positions), out)
        pack = load_pack(path)
        return io.NodeOutput(SteeringDictionary(pack, ALL_DOMAINS), format_pack(pack) + f"\n\nSaved to {path}")


NODES = [CombineDictionaries]
