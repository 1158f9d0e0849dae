// LoRA info: a panel with what a LoRA file's header says (base model, algorithm, rank, trigger
// words, tag frequency, training settings), from our read-only /lora_foundry/lora_info route.
// Opened from the LoRA stack rows, and from the context menu and the selection toolbox of any node with a lora_name
// widget.
import { app } from "../../scripts/app.js";
import { addStyle, el, getJSON } from "./lib/common.js";

const PANEL_ID = "lora-foundry-info";
// The frontend's Run controls (its action bar, top right by default): the panel opens below them.
const RUN_CONTROLS = ".actionbar, .queue-button-group, [data-testid='queue-button']";
const TOP = 60;

export function fetchLoraInfo(name) {
  return getJSON(`/lora_foundry/lora_info?name=${encodeURIComponent(name)}`);
}

// Every value below comes from a file someone else made: el() only ever sets it as text, never as HTML.

function section(panel, title, rows) {
  const entries = rows.filter(([, v]) => v !== undefined && v !== null && v !== "");
  if (!entries.length) return;
  panel.append(el("h4", null, title));
  const table = el("table");
  for (const [k, v] of entries) {
    const tr = el("tr");
    tr.append(el("th", null, k), el("td", null, v));
    table.append(tr);
  }
  panel.append(table);
}

function tagBars(tags) {
  const box = el("div", "lf-tags");
  const top = tags.length ? tags[0][1] : 1;
  for (const [tag, count] of tags) {
    const row = el("div", "lf-tag");
    const bar = el("span", "lf-tag-bar");
    bar.style.width = `${Math.max(2, (100 * count) / top)}%`;
    row.append(bar, el("span", "lf-tag-text", `${tag} (${count})`));
    box.append(row);
  }
  return box;
}

function panelElement() {
  let panel = document.getElementById(PANEL_ID);
  if (!panel) {
    panel = el("div", "lf-info-panel");
    panel.id = PANEL_ID;
    document.body.append(panel);
  }
  panel.replaceChildren();
  const close = el("button", "lf-info-close", "\u00d7");
  close.title = "Close";
  close.onclick = () => panel.remove();
  panel.append(close);
  placePanel(panel);
  return panel;
}

// Below every Run control that shares the panel's columns, wherever the user has dragged the action bar.
function placePanel(panel) {
  panel.style.top = `${TOP}px`;
  const box = panel.getBoundingClientRect();
  let top = TOP;
  for (const element of document.querySelectorAll(RUN_CONTROLS)) {
    const r = element.getBoundingClientRect();
    if (r.width && r.height && r.left < box.right && box.left < r.right && r.top < innerHeight / 2) {
      top = Math.max(top, r.bottom + 8);
    }
  }
  panel.style.top = `${top}px`;
  panel.style.maxHeight = `${Math.max(200, innerHeight - top - 16)}px`;
}

export function renderLoraInfo(panel, info) {
  panel.append(el("h3", null, info.title || info.name));
  panel.append(el("div", "lf-info-name", info.name));
  section(panel, "Adapter", [
    ["base model", info.base_model],
    ["algorithm", info.algorithm],
    ["rank", info.rank],
    ["alpha", info.alpha],
    ["modules", info.modules],
    ["text encoder", info.text_encoder ? "yes" : "no"],
    ["file size", `${(info.file_size / 1048576).toFixed(2)} MB`],
  ]);
  if (info.trigger_words?.length) {
    panel.append(el("h4", null, "Trigger words"));
    const words = el("div", "lf-triggers");
    for (const word of info.trigger_words) {
      const chip = el("button", "lf-chip", word);
      chip.title = "Copy";
      chip.onclick = () => navigator.clipboard?.writeText(word).catch(() => {});
      words.append(chip);
    }
    panel.append(words);
  }
  if (info.tag_frequency?.length) {
    panel.append(el("h4", null, "Tag frequency"));
    panel.append(tagBars(info.tag_frequency));
  }
  section(panel, "Training", Object.entries(info.training || {}));
  if (info.notes?.length) {
    panel.append(el("h4", null, "Notes"));
    for (const note of info.notes) panel.append(el("div", "lf-info-note", note));
  }
}

export async function showLoraInfo(name) {
  const panel = panelElement();
  panel.append(el("div", "lf-info-name", `Loading ${name}\u2026`));
  try {
    const info = await fetchLoraInfo(name);
    const fresh = panelElement();
    renderLoraInfo(fresh, info);
  } catch (err) {
    const fresh = panelElement();
    fresh.append(el("h3", null, name), el("div", "lf-info-error", `No info: ${err.message}`));
  }
}

const STYLE = `
.lf-info-panel { position: fixed; top: 60px; right: 16px; width: 340px; max-height: 75vh; overflow: auto;
  z-index: 1000; padding: 10px 12px; border-radius: 8px; font: 12px sans-serif;
  background: var(--comfy-menu-bg, #222); color: var(--input-text, #ddd);
  border: 1px solid var(--border-color, #444); box-shadow: 0 4px 16px rgba(0,0,0,.5); }
.lf-info-panel h3 { margin: 0 24px 2px 0; font-size: 14px; word-break: break-all; }
.lf-info-panel h4 { margin: 10px 0 4px; font-size: 12px; opacity: .8; }
.lf-info-panel table { width: 100%; border-collapse: collapse; }
.lf-info-panel th { text-align: left; font-weight: normal; opacity: .7; padding: 1px 8px 1px 0; white-space: nowrap; vertical-align: top; }
.lf-info-panel td { word-break: break-all; }
.lf-info-name { opacity: .6; word-break: break-all; }
.lf-info-error { color: #e66; margin-top: 6px; }
.lf-info-note { color: #db8; margin-top: 4px; }
.lf-info-close { position: absolute; top: 6px; right: 8px; background: none; border: none; color: inherit; font-size: 16px; cursor: pointer; }
.lf-chip { margin: 2px; padding: 2px 6px; border-radius: 10px; border: 1px solid var(--border-color, #555);
  background: var(--comfy-input-bg, #333); color: inherit; cursor: pointer; font-size: 11px; }
.lf-tag { position: relative; height: 16px; margin: 1px 0; }
.lf-tag-bar { position: absolute; left: 0; top: 0; bottom: 0; background: rgba(90,140,220,.35); border-radius: 2px; }
.lf-tag-text { position: relative; padding-left: 4px; white-space: nowrap; }
`;

// The LoRA a node loads: its lora_name combo's value (null when it has none or none is chosen).
function loraOf(node) {
  const widget = node?.widgets?.find((w) => w.name === "lora_name" && w.type === "combo");
  return widget?.value && widget.value !== "None" ? widget.value : null;
}

const INFO_COMMAND = "LoraFoundry.ShowLoraInfo";

// Two ways in, because no one place is in every frontend: the node's right-click menu (getNodeMenuItems: the
// classic canvas, and Nodes 2.0 on 1.58.1; Nodes 2.0 on 1.32.9 builds its menu with no extension hook),
// and the selection toolbox over a selected node (a right-click selects it), which both modes of both show.
app.registerExtension({
  name: "LoraFoundry.LoraInfo",
  commands: [{
    id: INFO_COMMAND,
    label: "LoRA info",
    icon: "pi pi-tag lf-lora-info", // (our own class: tests find the button by it)
    function: () => {
      const name = loraOf(Object.values(app.canvas?.selected_nodes ?? {}).find(loraOf));
      if (name) showLoraInfo(name);
    },
  }],
  setup() {
    addStyle("lora-foundry-info-style", STYLE);
  },
  getNodeMenuItems(node) {
    const name = loraOf(node);
    return name ? [{ content: "LoRA info", callback: () => showLoraInfo(name) }] : [];
  },
  getSelectionToolboxCommands(item) {
    return loraOf(item) ? [INFO_COMMAND] : [];
  },
});
