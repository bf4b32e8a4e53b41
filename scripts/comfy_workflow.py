"""ComfyUI workflows: UI format (what the frontend saves and artists share) -> API format (what POST /prompt
takes), checked against a server's /object_info. Imports no ComfyUI module and needs only the stdlib.

    info = fetch_object_info("http://127.0.0.1:8188")
    problems = check_workflow(workflow, info)          # [] when every node type and widget value is accepted
    prompt = ui_to_api(workflow, info)                  # {"<node id>": {"class_type", "inputs", "_meta"}}
    set_widget(workflow, "SafeDIGSteer", "mode", "Blend", info)

The frontend's rules this follows (ComfyUI frontend 1.32, ComfyUI 0.3.75):
- a node's `widgets_values` lists its widget inputs in the node's input order (/object_info `input_order`,
  required then optional); an input is a widget when its type is INT, FLOAT, STRING, BOOLEAN or COMBO (or a
  list of options) and it is not `forceInput`;
- an INT input named `seed` / `noise_seed` or any input with `control_after_generate` is followed by one extra
  entry (the control mode, e.g. "randomize"); a combo with `image_upload` (etc.) by the upload widget's entry;
- `links` rows are [link id, origin node, origin slot, target node, target slot, type]; a linked input
  becomes [origin node id, origin slot] in the API prompt (also a linked widget input);
- Note / MarkdownNote nodes exist only in the frontend and are skipped; Reroute nodes are followed;
  muted nodes (mode 2) are left out, bypassed nodes (mode 4) pass their first input of the same type through.
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterable
from pathlib import Path
from typing import Any

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
FRONTEND_ONLY = {"Note", "MarkdownNote"}
REROUTE = "Reroute"
MODE_MUTED, MODE_BYPASS = 2, 4
CONTROL_NAMES = {"seed", "noise_seed"}
UPLOAD_FLAGS = ("image_upload", "video_upload", "audio_upload", "animated_image_upload")


class WorkflowError(ValueError):
    """A workflow that cannot be converted (unknown node type, widget count mismatch, dangling link...)."""


# ------------------------------------------------------------------------------------------ server


def fetch_json(url: str, timeout: float = 60) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as r:  # only ever a 127.0.0.1 ComfyUI URL
        return json.load(r)


def fetch_object_info(base_url: str) -> dict:
    return fetch_json(base_url.rstrip("/") + "/object_info")


def load_workflow(path: str | Path) -> dict:
    data = json.loads(Path(path).read_text())
    if not isinstance(data, dict) or not isinstance(data.get("nodes"), list) or "links" not in data:
        raise WorkflowError(f"{path}: not a UI-format workflow (needs 'nodes' and 'links')")
    return data


# ------------------------------------------------------------------------------------------ node specs


def input_specs(node_info: dict) -> list[tuple[str, list, bool]]:
    """[(name, spec, required)] in the node's input order (hidden inputs left out)."""
    declared = node_info.get("input", {})
    order = node_info.get("input_order") or {k: list(declared.get(k, {})) for k in ("required", "optional")}
    out = []
    for section in ("required", "optional"):
        for name in order.get(section, []):
            spec = declared.get(section, {}).get(name)
            if spec is not None:
                out.append((name, spec, section == "required"))
    return out


def _opts(spec: list) -> dict:
    return spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}


def spec_type(spec: list) -> str:
    return "COMBO" if isinstance(spec[0], list) else str(spec[0])


def combo_options(spec: list) -> list:
    return list(spec[0]) if isinstance(spec[0], list) else list(_opts(spec).get("options", []))


def is_widget(spec: list) -> bool:
    return spec_type(spec) in WIDGET_TYPES and not _opts(spec).get("forceInput", False)


def widget_slots(node_info: dict) -> list[tuple[str | None, list | None]]:
    """The entries of `widgets_values` in order: (input name, spec), or (None, None) for the extra entry of a
    control_after_generate / upload widget."""
    slots: list[tuple[str | None, list | None]] = []
    for name, spec, _ in input_specs(node_info):
        if not is_widget(spec):
            continue
        slots.append((name, spec))
        opts = _opts(spec)
        control = opts.get("control_after_generate") or (spec_type(spec) == "INT" and name in CONTROL_NAMES)
        upload = spec_type(spec) == "COMBO" and any(opts.get(f) for f in UPLOAD_FLAGS)
        if control or upload:
            slots.append((None, None))
    return slots


def widget_values(node: dict, node_info: dict) -> dict[str, Any]:
    """{input name: value} of a UI node's widgets."""
    values = node.get("widgets_values", [])
    slots = widget_slots(node_info)
    if isinstance(values, dict):  # some custom frontends save widgets by name
        return {name: values[name] for name, _ in slots if name is not None and name in values}
    if len(values) != len(slots):
        names = [n or "(control)" for n, _ in slots]
        raise WorkflowError(f"node {node.get('id')} ({node.get('type')}): {len(values)} widgets_values "
                            f"{values!r} for {len(slots)} widgets {names}")
    return {name: v for (name, _), v in zip(slots, values, strict=True) if name is not None}


# ------------------------------------------------------------------------------------------ graph


def _links(workflow: dict) -> dict[int, tuple[int, int, int, int, str]]:
    out = {}
    for row in workflow.get("links", []):
        if isinstance(row, dict):  # the newer schema stores links as objects
            row = [row["id"], row["origin_id"], row["origin_slot"], row["target_id"], row["target_slot"],
                   row.get("type", "*")]
        link_id, origin, slot, target, target_slot, typ = row[:6]
        out[int(link_id)] = (int(origin), int(slot), int(target), int(target_slot), typ)
    return out


def _nodes(workflow: dict) -> dict[int, dict]:
    if workflow.get("definitions", {}).get("subgraphs"):
        raise WorkflowError("workflows with subgraphs are not supported by this converter")
    return {int(n["id"]): n for n in workflow["nodes"]}


def _source(nodes: dict[int, dict], links: dict, link_id: int, seen: frozenset = frozenset()) -> tuple[int, int] | None:
    """The (node, slot) that really produces a link's value: through Reroutes and bypassed nodes; None when
    the value comes from a muted node or nothing."""
    if link_id not in links or link_id in seen:
        return None
    origin, slot, _, _, typ = links[link_id]
    node = nodes.get(origin)
    if node is None:
        raise WorkflowError(f"link {link_id} starts at missing node {origin}")
    seen = seen | {link_id}
    if node.get("type") == REROUTE:
        upstream = (node.get("inputs") or [{}])[0].get("link")
        return _source(nodes, links, upstream, seen) if upstream is not None else None
    if node.get("mode") == MODE_MUTED:
        return None
    if node.get("mode") == MODE_BYPASS:
        out_type = (node.get("outputs") or [])[slot].get("type", typ) if slot < len(node.get("outputs") or []) else typ
        for inp in node.get("inputs") or []:
            if inp.get("link") is not None and inp.get("type") == out_type:
                return _source(nodes, links, inp["link"], seen)
        return None
    return origin, slot


def ui_to_api(workflow: dict, object_info: dict) -> dict[str, dict]:
    """The API-format prompt of a UI-format workflow (what the frontend's "Queue" sends)."""
    nodes, links = _nodes(workflow), _links(workflow)
    prompt: dict[str, dict] = {}
    for node_id, node in sorted(nodes.items()):
        typ = node.get("type")
        if typ in FRONTEND_ONLY or typ == REROUTE or node.get("mode") in (MODE_MUTED, MODE_BYPASS):
            continue
        info = object_info.get(typ)
        if info is None:
            raise WorkflowError(f"node {node_id}: type {typ!r} is not known to this ComfyUI")
        inputs: dict[str, Any] = dict(widget_values(node, info))
        for inp in node.get("inputs") or []:
            if inp.get("link") is None:
                continue
            src = _source(nodes, links, inp["link"])
            if src is None:
                inputs.pop(inp["name"], None)
                continue
            inputs[inp["name"]] = [str(src[0]), src[1]]
        entry = {"class_type": typ, "inputs": inputs}
        if node.get("title"):
            entry["_meta"] = {"title": node["title"]}
        prompt[str(node_id)] = entry
    return prompt


# ------------------------------------------------------------------------------------------ checks


def _types_match(out_type: str, in_type: str) -> bool:
    if "*" in (out_type, in_type):
        return True
    outs, ins = set(str(out_type).split(",")), set(str(in_type).split(","))
    return bool(outs & ins)


def check_value(name: str, spec: list, value: Any) -> str | None:
    """Why the server would refuse `value` for this widget, or None."""
    typ, opts = spec_type(spec), _opts(spec)
    if typ == "COMBO":
        options = combo_options(spec)
        return None if value in options else f"{name}={value!r} is not one of {options[:12]}"
    if typ == "BOOLEAN":
        return None if isinstance(value, bool) else f"{name}={value!r} is not a boolean"
    if typ == "STRING":
        return None if isinstance(value, str) else f"{name}={value!r} is not a string"
    if typ in ("INT", "FLOAT"):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (typ == "INT" and value != int(value)):
            return f"{name}={value!r} is not a{'n integer' if typ == 'INT' else ' number'}"
        if "min" in opts and value < opts["min"]:
            return f"{name}={value!r} is below the minimum {opts['min']}"
        if "max" in opts and value > opts["max"]:
            return f"{name}={value!r} is above the maximum {opts['max']}"
    return None


def check_workflow(workflow: dict, object_info: dict) -> list[str]:
    """Everything in a UI-format workflow that this server's /object_info does not accept: unknown node types,
    widget counts and values (combo options, min/max, types), link types, unconnected required inputs."""
    problems: list[str] = []
    try:
        nodes, links = _nodes(workflow), _links(workflow)
    except (WorkflowError, KeyError, TypeError, ValueError) as exc:
        return [f"workflow structure: {exc}"]
    for node_id, node in sorted(nodes.items()):
        typ = node.get("type")
        if typ in FRONTEND_ONLY or typ == REROUTE:
            continue
        info = object_info.get(typ)
        where = f"node {node_id} ({typ})"
        if info is None:
            problems.append(f"{where}: unknown node type")
            continue
        try:
            values = widget_values(node, info)
        except WorkflowError as exc:
            problems.append(str(exc))
            continue
        linked = {i["name"] for i in node.get("inputs") or [] if i.get("link") is not None}
        specs = {name: (spec, req) for name, spec, req in input_specs(info)}
        for inp in node.get("inputs") or []:
            if inp["name"] not in specs:
                problems.append(f"{where}: input {inp['name']!r} does not exist")
                continue
            if inp.get("link") is None:
                continue
            if inp["link"] not in links:
                problems.append(f"{where}: input {inp['name']!r} uses missing link {inp['link']}")
                continue
            origin, slot, target, _, _ = links[inp["link"]]
            origin_node = nodes.get(origin)
            if target != node_id or origin_node is None:
                problems.append(f"{where}: link {inp['link']} does not join node {origin} to this node")
                continue
            origin_info = object_info.get(origin_node.get("type"))
            if origin_info is not None:
                outs = origin_info.get("output", [])
                if slot >= len(outs):
                    problems.append(f"{where}: {inp['name']!r} links to missing output {slot} of node {origin}")
                    continue
                want = spec_type(specs[inp["name"]][0])
                out_type = "COMBO" if isinstance(outs[slot], list) else outs[slot]
                if not _types_match(out_type, want):
                    problems.append(f"{where}: {inp['name']!r} ({want}) is linked to a {out_type} output")
        for name, (spec, required) in specs.items():
            if name in linked:
                continue
            if name in values:
                why = check_value(name, spec, values[name])
                if why:
                    problems.append(f"{where}: {why}")
            elif required:
                problems.append(f"{where}: required input {name!r} is not connected")
    return problems


# ------------------------------------------------------------------------------------------ editing


def nodes_of_type(workflow: dict, node_type: str) -> list[dict]:
    return [n for n in workflow["nodes"] if n.get("type") == node_type]


def set_widget(workflow: dict, node_type: str, name: str, value: Any, object_info: dict,
               node_ids: Iterable[int] | None = None) -> int:
    """Set widget `name` on every node of `node_type` (or those in node_ids); returns how many changed."""
    info = object_info[node_type]
    slots = [n for n, _ in widget_slots(info)]
    if name not in slots:
        raise WorkflowError(f"{node_type} has no widget {name!r} (widgets: {[s for s in slots if s]})")
    index = slots.index(name)
    wanted = None if node_ids is None else {int(i) for i in node_ids}
    count = 0
    for node in nodes_of_type(workflow, node_type):
        if wanted is None or int(node["id"]) in wanted:
            node["widgets_values"][index] = value
            count += 1
    return count
