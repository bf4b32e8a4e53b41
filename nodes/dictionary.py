"""SafeDIG Load Dictionary: a pack from the safedig folders, with one of its domains chosen."""

from __future__ import annotations

from safedig_core import ALL_DOMAINS, SteeringDictionary, load_pack
from safedig_core.errors import SafeDIGError
from safedig_core.pack_info import format_pack

from . import packs
from .compat import io
from .types import SafeDIGDict


class LoadDictionary(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SafeDIGLoadDictionary",
            display_name="SafeDIG Load Dictionary",
            category="SafeDIG",
            description="Load a SafeDIG dictionary pack (models/safedig/ or the shipped dictionaries/) and pick "
                        "the risk domains that steer: all of them (default), the source domain or one adapted "
                        "target domain.",
            inputs=[
                io.Combo.Input("pack", options=packs.list_packs(),
                               tooltip="A .safetensors pack from models/safedig/ (or extra_model_paths.yaml "
                                       "`safedig:` folders) or the packs shipped with SafeDIG."),
                io.Combo.Input("domain", options=packs.all_domains(), default=ALL_DOMAINS,
                               tooltip="(all domains): every risk domain of the pack at once, each token "
                                       "steered by the domain whose gate opens widest. (source): the pack's "
                                       "source domain only; otherwise one domain the pack was adapted to."),
            ],
            outputs=[
                SafeDIGDict.Output(display_name="dictionary"),
                io.String.Output(display_name="pack_info", tooltip="Routed positions, routing table, provenance."),
            ],
        )

    @classmethod
    def validate_inputs(cls, pack, domain) -> bool | str:
        if pack is None:  # linked: checked at execution
            return True
        try:  # the whole header pass (metadata schema, tensor shapes): a bad pack is refused with HTTP 400
            info = packs.pack_summary(packs.resolve_pack(pack))
        except SafeDIGError as exc:
            return str(exc)
        if domain is not None and domain not in (ALL_DOMAINS, packs.SOURCE_DOMAIN) and domain not in info.domains:
            return (f"pack {pack!r} has no domain {domain!r}. Fix: choose {ALL_DOMAINS}, {packs.SOURCE_DOMAIN} "
                    f"or one of {list(info.domains)}.")
        return True

    @classmethod
    def fingerprint_inputs(cls, pack, domain):
        return (packs.file_fingerprint(pack), domain)

    @classmethod
    def execute(cls, pack, domain) -> io.NodeOutput:
        path = packs.resolve_pack(pack)
        loaded = load_pack(path)
        chosen = None if domain in (None, "", packs.SOURCE_DOMAIN) else domain
        dictionary = SteeringDictionary(loaded, chosen)
        return io.NodeOutput(dictionary, format_pack(loaded) + f"\n\nSteering domain: {dictionary.domain}")
