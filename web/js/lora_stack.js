// LoRA stack widget: rows of (on, LoRA, model strength, clip strength, block weights) that the
// user adds, removes and reorders. The rows live as JSON in the node's `loras` STRING widget (so
// workflows save and restore them and the prompt carries them); this widget only edits that JSON.
// Strengths: drag left/right to change (shift: finer), click to type an exact value.
import { app } from "../../scripts/app.js";
import { addStyle, el, getJSON, setWidgetsHidden } from "./lib/common.js";
import { showLoraInfo } from "./lora_info.js";

const STACK_NODES = new Set(["LoraFoundryLoraStack", "LoraFoundryApplyLoraStack"]);
const ROW_HEIGHT = 28;
const DRAG_PX = 3;
const MARGIN = 4;
let loraNames = [];
let blockPresets = {};

export async function refreshLoraNames() {
  try {
    loraNames = await getJSON("/models/loras", { cache: "no-store" });
  } catch (err) {
    console.warn("Lora Foundry: could not list LoRAs", err);
  }
  return loraNames;
}

async function refreshBlockPresets() {
  blockPresets = await getJSON("/lora_foundry/block_presets").catch(() => ({}));
}

export function parseRows(text) {
  if (!text || !text.trim() || text.trim() === "[]") return [];
  let rows;
  try {
    rows = JSON.parse(text);
  } catch {
    return null;
  }
  if (!Array.isArray(rows)) return null;
  return rows.map((r) => ({
    on: r.on !== false,
    lora: String(r.lora ?? ""),
    strength_model: Number(r.strength_model ?? 1),
    strength_clip: Number(r.strength_clip ?? r.strength_model ?? 1),
    block_weights: String(r.block_weights ?? ""),
  }));
}

const round = (v) => Math.round(v * 1000) / 1000;
const fmt = (v) => (Number.isInteger(v * 100) ? v.toFixed(2) : String(v));

// A number you drag to change and click to type.
function strengthControl(value, title, onChange) {
  const box = el("span", "lf-strength", fmt(value));
  box.title = `${title}: drag to change (shift: finer), click to type`;
  box.tabIndex = 0;
  let start = null;
  box.addEventListener("pointerdown", (e) => {
    if (e.button !== 0) return;
    e.stopPropagation();
    e.preventDefault();
    box.setPointerCapture(e.pointerId);
    start = { x: e.clientX, value, dragged: false };
  });
  box.addEventListener("pointermove", (e) => {
    if (!start) return;
    const dx = e.clientX - start.x;
    if (!start.dragged && Math.abs(dx) < DRAG_PX) return;
    start.dragged = true;
    value = round(start.value + dx * (e.shiftKey ? 0.001 : 0.01));
    box.textContent = fmt(value);
  });
  box.addEventListener("pointerup", (e) => {
    if (!start) return;
    box.releasePointerCapture(e.pointerId);
    const dragged = start.dragged;
    start = null;
    if (dragged) onChange(value);
    else edit();
  });
  box.addEventListener("keydown", (e) => {
    if (e.key === "Enter") edit();
  });
  function edit() {
    const input = el("input", "lf-strength-input");
    input.type = "number";
    input.step = "0.01";
    input.value = String(value);
    let done = false;
    const commit = (keep) => {
      if (done) return;
      done = true;
      const typed = parseFloat(input.value);
      if (keep && Number.isFinite(typed)) {
        value = round(typed);
        onChange(value);
      }
      input.replaceWith(box);
      box.textContent = fmt(value);
    };
    input.addEventListener("keydown", (e) => {
      e.stopPropagation();
      if (e.key === "Enter") commit(true);
      if (e.key === "Escape") commit(false);
    });
    input.addEventListener("blur", () => commit(true));
    box.replaceWith(input);
    input.focus();
    input.select();
  }
  return box;
}

class StackWidget {
  constructor(node, textWidget) {
    this.node = node;
    this.text = textWidget;
    this.element = el("div", "lf-stack");
    this.element.addEventListener("pointerdown", (e) => e.stopPropagation());
    this.widget = node.addDOMWidget("lora_stack_ui", "lora_foundry_stack", this.element, {
      serialize: false,
      hideOnZoom: false,
      margin: MARGIN,
      getValue: () => this.text.value,
      setValue: () => {},
      getMinHeight: () => this.height(),
      getMaxHeight: () => this.height(),
    });
    this.widget.serialize = false;
    setWidgetsHidden(node, [textWidget], true); // the JSON it edits: kept (and saved), not shown
    this.render();
  }

  rows() {
    return parseRows(this.text.value) ?? [];
  }

  height() {
    return 2 * MARGIN + 16 + this.rows().length * ROW_HEIGHT + 30; // header, rows, add button
  }

  save(rows) {
    this.text.value = JSON.stringify(rows);
    this.text.callback?.(this.text.value);
    this.render();
    const [w, h] = this.node.size;
    const need = this.node.computeSize()[1];
    if (need > h) this.node.setSize([w, need]);
    this.node.setDirtyCanvas(true, true);
  }

  update(index, changes) {
    const rows = this.rows();
    Object.assign(rows[index], changes);
    this.save(rows);
  }

  render() {
    const rows = parseRows(this.text.value);
    this.element.replaceChildren();
    if (rows === null) {
      this.element.append(el("div", "lf-stack-error", "loras is not a JSON list of rows; fix it or clear it"));
      const clear = el("button", "lf-add", "Clear");
      clear.onclick = () => this.save([]);
      this.element.append(clear);
      return;
    }
    const header = el("div", "lf-row lf-head");
    header.append(el("span", "lf-on"), el("span", "lf-name-h", "LoRA"), el("span", "lf-strength-h", "model"),
      el("span", "lf-strength-h", "clip"), el("span", "lf-blocks-h", "blocks"), el("span", "lf-tools"));
    this.element.append(header);
    rows.forEach((row, i) => this.element.append(this.renderRow(row, i, rows.length)));
    const add = el("button", "lf-add", "+ Add LoRA");
    add.onclick = async () => {
      const names = loraNames.length ? loraNames : await refreshLoraNames();
      const rowsNow = this.rows();
      const used = new Set(rowsNow.map((r) => r.lora));
      const lora = names.find((n) => !used.has(n)) ?? names[0] ?? "";
      rowsNow.push({ on: true, lora, strength_model: 1.0, strength_clip: 1.0, block_weights: "" });
      this.save(rowsNow);
    };
    this.element.append(add);
  }

  renderRow(row, i, count) {
    const line = el("div", "lf-row");
    line.dataset.index = String(i);
    if (!row.on) line.classList.add("lf-off");

    const on = el("input", "lf-on");
    on.type = "checkbox";
    on.checked = row.on;
    on.title = "on / off";
    on.onchange = () => this.update(i, { on: on.checked });

    const select = el("select", "lf-name");
    const names = loraNames.includes(row.lora) || !row.lora ? loraNames : [row.lora, ...loraNames];
    for (const name of names) {
      const option = el("option", null, loraNames.includes(name) ? name : `${name} (missing)`);
      option.value = name;
      select.append(option);
    }
    select.value = row.lora;
    select.title = row.lora;
    select.onchange = () => this.update(i, { lora: select.value });

    const model = strengthControl(row.strength_model, "model strength", (v) => this.update(i, { strength_model: v }));
    const clip = strengthControl(row.strength_clip, "clip strength", (v) => this.update(i, { strength_clip: v }));
    model.classList.add("lf-model");
    clip.classList.add("lf-clip");

    const blocks = el("input", "lf-blocks");
    blocks.value = row.block_weights;
    blocks.placeholder = "all";
    blocks.title = "Block weights: a preset name or comma-separated values (17 for SD1.x/2.x, 12 for SDXL)";
    blocks.setAttribute("list", "lora-foundry-block-presets");
    blocks.addEventListener("keydown", (e) => e.stopPropagation());
    blocks.onchange = () => this.update(i, { block_weights: blocks.value.trim() });

    const tools = el("span", "lf-tools");
    const button = (label, title, action, disabled = false) => {
      const b = el("button", "lf-tool", label);
      b.title = title;
      b.disabled = disabled;
      b.onclick = action;
      tools.append(b);
    };
    button("\u2191", "Move up", () => this.move(i, -1), i === 0);
    button("\u2193", "Move down", () => this.move(i, 1), i === count - 1);
    button("i", "LoRA info", () => row.lora && showLoraInfo(row.lora), !row.lora);
    button("\u2715", "Remove", () => this.save(this.rows().filter((_, j) => j !== i)));

    line.append(on, select, model, clip, blocks, tools);
    return line;
  }

  move(i, delta) {
    const rows = this.rows();
    const j = i + delta;
    if (j < 0 || j >= rows.length) return;
    [rows[i], rows[j]] = [rows[j], rows[i]];
    this.save(rows);
  }
}

function presetList() {
  let list = document.getElementById("lora-foundry-block-presets");
  if (!list) {
    list = el("datalist");
    list.id = "lora-foundry-block-presets";
    document.body.append(list);
  }
  list.replaceChildren(...Object.keys(blockPresets).map((name) => {
    const option = el("option");
    option.value = name;
    option.label = blockPresets[name];
    return option;
  }));
}

const STYLE = `
.lf-stack { box-sizing: border-box; width: 100%; height: 100%; overflow: hidden; font: 12px sans-serif;
  color: var(--input-text, #ddd); padding: 2px 4px; }
.lf-row { display: flex; align-items: center; gap: 4px; height: ${ROW_HEIGHT - 4}px; margin-bottom: 4px; }
.lf-row.lf-off { opacity: .5; }
.lf-head { height: 14px; margin-bottom: 2px; opacity: .6; font-size: 10px; }
.lf-on { flex: 0 0 16px; margin: 0; }
.lf-name { flex: 1 1 auto; min-width: 60px; width: 0; height: 22px; background: var(--comfy-input-bg, #222);
  color: inherit; border: 1px solid var(--border-color, #444); border-radius: 4px; }
.lf-name-h { flex: 1 1 auto; min-width: 60px; width: 0; }
.lf-strength, .lf-strength-input, .lf-strength-h { flex: 0 0 46px; width: 46px; box-sizing: border-box; text-align: center; }
.lf-strength { cursor: ew-resize; user-select: none; padding: 3px 0; border-radius: 4px;
  background: var(--comfy-input-bg, #222); border: 1px solid var(--border-color, #444); }
.lf-strength-input { height: 22px; background: var(--comfy-input-bg, #222); color: inherit; border: 1px solid #68f; border-radius: 4px; }
.lf-blocks, .lf-blocks-h { flex: 0 0 56px; width: 56px; box-sizing: border-box; }
.lf-blocks { height: 22px; background: var(--comfy-input-bg, #222); color: inherit; border: 1px solid var(--border-color, #444); border-radius: 4px; }
.lf-tools { flex: 0 0 84px; display: flex; gap: 1px; }
.lf-tool { width: 20px; height: 20px; padding: 0; background: none; color: inherit; border: 1px solid transparent;
  border-radius: 3px; cursor: pointer; }
.lf-tool:hover:not(:disabled) { border-color: var(--border-color, #555); }
.lf-tool:disabled { opacity: .3; cursor: default; }
.lf-add { width: 100%; height: 22px; background: var(--comfy-input-bg, #222); color: inherit;
  border: 1px dashed var(--border-color, #555); border-radius: 4px; cursor: pointer; }
.lf-stack-error { color: #e66; margin: 4px 0; }
`;

app.registerExtension({
  name: "LoraFoundry.LoraStack",
  async setup() {
    addStyle("lora-foundry-stack-style", STYLE);
    await Promise.all([refreshLoraNames(), refreshBlockPresets()]);
    presetList();
    for (const node of app.graph?.nodes ?? []) node.loraFoundryStack?.render();
  },
  nodeCreated(node) {
    if (!STACK_NODES.has(node.comfyClass)) return;
    const text = node.widgets?.find((w) => w.name === "loras");
    if (!text) return;
    node.loraFoundryStack = new StackWidget(node, text);
    const configure = node.onConfigure;
    node.onConfigure = function (info) {
      const result = configure?.apply(this, arguments);
      this.loraFoundryStack.render();
      return result;
    };
  },
});
