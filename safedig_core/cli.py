"""`python -m safedig_core SUBCOMMAND`: the command line of the core.

Each module in SUBCOMMAND_MODULES exposes `add_subcommands(subparsers)`; every subcommand sets
`func(args) -> int`. Modules are imported only when the CLI runs.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys

from .errors import SafeDIGError

SUBCOMMAND_MODULES: tuple[str, ...] = ("safedig_core.cli", "safedig_core.bundled.cli", "safedig_core.training.cli")


def add_subcommands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("positions", help="list position ids for a reference model, an architecture or a model file")
    p.add_argument("target", help="flux-dev, sd35-large, flux:DOUBLE:SINGLE, sd3:JOINT, or a .safetensors model file")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_positions)

    p = sub.add_parser("inspect", help="show a pack's metadata and routing table")
    p.add_argument("pack", help="path to a .safetensors dictionary pack")
    p.add_argument("--json", action="store_true", help="print the full metadata as JSON")
    p.set_defaults(func=_inspect)

    p = sub.add_parser("combine", help="one pack from two: one pack's gate detects, the other's Blend steers")
    p.add_argument("--detect", required=True, metavar="PACK:POS[,POS]", help="the pack and positions that detect")
    p.add_argument("--steer", required=True, metavar="PACK:POS[,POS]", help="the pack and positions that steer")
    p.add_argument("--out", required=True, help="the combined .safetensors pack")
    p.set_defaults(func=_combine)


def _positions(args) -> int:
    from .positions import REFERENCE_MODELS, get_architecture, positions_from_state_dict, reference_ids

    target = args.target
    if target in REFERENCE_MODELS:
        arch, d_model, blocks, singles = REFERENCE_MODELS[target]
        ids, source = reference_ids(arch, blocks, singles), f"{target} (d_model {d_model})"
    elif target.endswith(".safetensors"):
        from .pack import read_header

        header = read_header(target)
        arch, backend, d_model, ids = positions_from_state_dict(
            {k: v["shape"] for k, v in header.items() if k != "__metadata__"})
        source = f"{target}: {arch} via {backend} layout (d_model {d_model})"
    else:
        arch, *counts = target.split(":")
        get_architecture(arch)
        try:
            nums = [int(c) for c in counts]
        except ValueError:
            raise SafeDIGError(f"bad block counts in {target!r}", "write e.g. flux:19:38 or sd3:38") from None
        if not nums:
            raise SafeDIGError(f"no block counts in {target!r}", "write e.g. flux:19:38 or sd3:38")
        ids, source = reference_ids(arch, *nums[:2]), target
    if args.json:
        print(json.dumps({"source": source, "architecture": arch, "positions": ids}, indent=2))
    else:
        print(f"# {source}: {len(ids)} positions")
        print("\n".join(ids))
    return 0


def _inspect(args) -> int:
    from .pack import load_pack
    from .pack_info import format_pack

    pack = load_pack(args.pack)
    print(json.dumps(pack.metadata, indent=2, sort_keys=True) if args.json else format_pack(pack))
    return 0


def _pack_positions(spec: str, flag: str) -> tuple[str, list[str]]:
    path, sep, positions = spec.rpartition(":")
    if not sep or not path or not positions:
        raise SafeDIGError(f"{flag} {spec!r} names no positions", f"write {flag} PACK.safetensors:POSITION[,POSITION]")
    return path, [p.strip() for p in positions.split(",") if p.strip()]


def _combine(args) -> int:
    from .combine import combine_packs
    from .pack import load_pack
    from .pack_info import format_pack

    (det, det_at), (steer, steer_at) = _pack_positions(args.detect, "--detect"), _pack_positions(args.steer, "--steer")
    path = combine_packs(load_pack(det), det_at, load_pack(steer), steer_at, args.out)
    print(format_pack(load_pack(path)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m safedig_core", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="SUBCOMMAND")
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(name).add_subcommands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except SafeDIGError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
