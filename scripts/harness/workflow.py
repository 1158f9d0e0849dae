"""Turn a UI-format workflow (what the frontend saves and example_workflows/ holds) into the
API prompt the frontend would queue, using the server's /object_info for input order."""

from __future__ import annotations

import copy

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
SEED_CONTROL_VALUES = {"fixed", "increment", "decrement", "randomize"}
MUTED, BYPASSED = 2, 4
VIRTUAL_NODES = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}


def _is_widget(spec) -> bool:
    kind = spec[0]
    return isinstance(kind, list) or kind in WIDGET_TYPES


def _has_seed_control(name: str, spec) -> bool:
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    return spec[0] == "INT" and (opts.get("control_after_generate") or name in ("seed", "noise_seed"))


def widget_inputs(info: dict) -> list[tuple[str, list]]:
    """(name, spec) of a node's widget inputs in the order the frontend lays out widgets."""
    out = []
    for section in ("required", "optional"):
        for name, spec in info.get("input", {}).get(section, {}).items():
            if _is_widget(spec):
                out.append((name, spec))
    return out


def widget_positions(values: list, info: dict) -> dict[str, int]:
    """{input name: index} in a list widgets_values (the frontend's seed control values skipped)."""
    out, i = {}, 0
    for name, spec in widget_inputs(info):
        if i >= len(values):
            break
        out[name] = i
        i += 1
        if _has_seed_control(name, spec) and i < len(values) and values[i] in SEED_CONTROL_VALUES:
            i += 1
    return out


def widget_values_to_inputs(values, info: dict) -> dict:
    """Map a node's widgets_values (list, or dict in newer frontends) to named inputs."""
    if isinstance(values, dict):
        return dict(values)
    values = list(values or [])
    return {name: values[i] for name, i in widget_positions(values, info).items()}


def to_api_prompt(workflow: dict, object_info: dict) -> dict:
    """Convert a UI workflow to an API prompt ({id: {class_type, inputs}})."""
    workflow = copy.deepcopy(workflow)
    nodes = {n["id"]: n for n in workflow["nodes"]}
    links = {link[0]: link for link in workflow.get("links", [])}

    def source(link_id):
        """Follow reroutes and bypassed nodes back to the real (node id, slot) feeding a link."""
        link = links.get(link_id)
        while link is not None:
            origin_id, origin_slot, link_type = link[1], link[2], link[5]
            origin = nodes[origin_id]
            if origin["type"] == "Reroute":
                link = links.get(origin["inputs"][0].get("link"))
                continue
            if origin.get("mode") == BYPASSED:
                match = [x for x in origin.get("inputs", []) if x.get("type") == link_type and x.get("link") is not None]
                link = links.get(match[0]["link"]) if match else None
                continue
            if origin.get("mode") == MUTED:
                return None
            return [str(origin_id), origin_slot]
        return None

    prompt = {}
    for node in workflow["nodes"]:
        kind = node["type"]
        if kind in VIRTUAL_NODES or node.get("mode") in (MUTED, BYPASSED):
            continue
        if kind not in object_info:
            raise KeyError(f"node {node['id']}: type {kind!r} is not known to the server (missing custom node?)")
        info = object_info[kind]
        inputs = widget_values_to_inputs(node.get("widgets_values"), info)
        for slot in node.get("inputs", []):
            if slot.get("link") is None:
                continue
            src = source(slot["link"])
            if src is None:
                inputs.pop(slot["name"], None)
                continue
            origin = nodes[int(src[0])]
            if origin["type"] == "PrimitiveNode":
                inputs[slot["name"]] = (origin.get("widgets_values") or [None])[0]
            else:
                inputs[slot["name"]] = src
        prompt[str(node["id"])] = {"class_type": kind, "inputs": inputs}
    return prompt


def default_inputs(info: dict) -> dict:
    """A node's required widget inputs at their defaults (combos: the first option), for an API prompt."""
    out = {}
    for name, spec in info["input"]["required"].items():
        kind, options = spec[0], spec[1] if len(spec) > 1 else {}
        if isinstance(kind, list):
            out[name] = options.get("default", kind[0])
        elif kind == "COMBO":
            out[name] = options.get("default", options.get("options", [None])[0])
        elif "default" in options:
            out[name] = options["default"]
    return out


def train_prompt(info: dict, checkpoint: str, images, name: str, **widgets) -> dict:
    """Checkpoint -> Load Dataset -> Train LoRA (rank 1, attention, 1 step at 64 px, `widgets` on top) -> Preview of
    its summary: a valid API prompt for a server whose /object_info is `info`."""
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint}},
        "2": {"class_type": "LoraFoundryLoadDataset", "inputs": {
            **default_inputs(info["LoraFoundryLoadDataset"]), "folder": str(images), "resolution": 64,
            "min_side": 64, "max_side": 64}},
        "3": {"class_type": "LoraFoundryTrainLoRA", "inputs": {
            **default_inputs(info["LoraFoundryTrainLoRA"]), "model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2],
            "dataset": ["2", 0], "output_name": name, "rank": 1, "alpha": 1.0, "targets": "attention", "steps": 1,
            **widgets}},
        "4": {"class_type": "PreviewAny", "inputs": {"source": ["3", 4]}},
    }
