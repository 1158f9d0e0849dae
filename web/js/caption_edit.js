// Caption editing on the Caption Images node: after a run, each image it shows gets its caption in a
// text box and a Save button, which writes that image's caption file (POST /lora_foundry/caption; the
// server only writes the caption files of the images that run showed).
import { app } from "../../scripts/app.js";
import { addStyle, el, getJSON, nodeElement, vueNodes } from "./lib/common.js";

const CAPTION_NODE = "LoraFoundryCaptionImages";
const ROW_HEIGHT = 86;
const MAX_HEIGHT = 360;
const EMPTY_HEIGHT = 24;

class CaptionEditor {
  constructor(node) {
    this.node = node;
    this.rows = [];
    this.element = el("div", "lf-captions");
    this.element.addEventListener("pointerdown", (e) => e.stopPropagation()); // type and select, not drag the node
    this.widget = node.addDOMWidget("caption_editor", "lora_foundry_captions", this.element, {
      serialize: false,
      hideOnZoom: false,
      getValue: () => "",
      setValue: () => {},
      getMinHeight: () => this.height(),
      getMaxHeight: () => this.height(),
    });
    this.widget.serialize = false;
    this.widget.editor = this;
    this.render();
  }

  height() {
    return this.rows.length ? Math.min(MAX_HEIGHT, 8 + this.rows.length * ROW_HEIGHT) : EMPTY_HEIGHT;
  }

  // The rows of a run: [{token, image, caption}], from the node's executed message.
  show(rows) {
    this.rows = rows.map((r) => ({ token: String(r.token), image: String(r.image), caption: String(r.caption) }));
    this.render();
    this.element.style.height = `${this.height()}px`;
    const [width, height] = this.node.size;
    const need = this.node.computeSize()[1];
    if (need > height) this.node.setSize([width, need]);
    if (vueNodes()) nodeElement(this.node)?.style.setProperty("--node-height", "0px"); // its content's height
    this.node.setDirtyCanvas?.(true, true);
  }

  render() {
    this.element.replaceChildren();
    if (!this.rows.length) {
      this.element.append(el("div", "lf-captions-hint", "Run the node to edit the captions of the images it shows."));
      return;
    }
    for (const row of this.rows) this.element.append(this.renderRow(row));
  }

  renderRow(row) {
    const box = el("div", "lf-caption-row");
    box.dataset.image = row.image;
    const name = el("span", "lf-caption-name", row.image);
    name.title = row.image;
    const save = el("button", "lf-caption-save", "Save");
    const status = el("span", "lf-caption-status");
    const text = el("textarea", "lf-caption-text");
    text.value = row.caption;
    text.rows = 2;
    text.spellcheck = false;
    text.addEventListener("input", () => {
      status.textContent = text.value === row.caption ? "" : "edited";
      status.classList.remove("lf-caption-error");
    });
    save.onclick = async () => {
      save.disabled = true;
      status.textContent = "saving\u2026";
      status.classList.remove("lf-caption-error");
      try {
        const answer = await getJSON("/lora_foundry/caption", {
          method: "POST",
          headers: { "Content-Type": "application/json" },
          body: JSON.stringify({ token: row.token, image: row.image, caption: text.value }),
        });
        row.caption = text.value;
        status.textContent = "saved";
        status.title = answer.path;
      } catch (err) {
        status.textContent = err.message;
        status.title = err.message;
        status.classList.add("lf-caption-error");
      } finally {
        save.disabled = false;
      }
    };
    const head = el("div", "lf-caption-head");
    head.append(name, status, save);
    box.append(head, text);
    return box;
  }
}

const STYLE = `
.lf-captions { box-sizing: border-box; width: 100%; overflow-y: auto; display: flex; flex-direction: column; gap: 6px;
  padding: 2px 4px; font: 11px sans-serif; color: var(--input-text, #ddd); }
.lg-node .lf-captions { contain: inline-size; } /* Nodes 2.0: as wide as the node, never wider */
.lf-captions-hint { opacity: 0.7; padding: 4px 0; }
.lf-caption-row { display: flex; flex-direction: column; gap: 2px; }
.lf-caption-head { display: flex; align-items: center; gap: 6px; min-width: 0; }
.lf-caption-name { flex: 1 1 auto; min-width: 0; overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
.lf-caption-status { flex: 0 1 auto; min-width: 0; overflow: hidden; text-overflow: ellipsis; white-space: nowrap; opacity: 0.8; }
.lf-caption-error { color: #ff7070; opacity: 1; }
.lf-caption-save { flex: 0 0 auto; padding: 1px 8px; font: inherit; color: inherit; cursor: pointer;
  background: var(--comfy-input-bg, #222); border: 1px solid var(--border-color, #444); border-radius: 4px; }
.lf-caption-text { box-sizing: border-box; width: 100%; height: 52px; resize: none; font: inherit; color: inherit;
  background: var(--comfy-input-bg, #222); border: 1px solid var(--border-color, #444); border-radius: 4px; padding: 2px 4px; }
`;

app.registerExtension({
  name: "LoraFoundry.CaptionEdit",
  setup() {
    addStyle("lora-foundry-caption-style", STYLE);
  },
  nodeCreated(node) {
    if (node.comfyClass !== CAPTION_NODE) return;
    new CaptionEditor(node);
    const executed = node.onExecuted;
    node.onExecuted = function (output) {
      const result = executed?.apply(this, arguments);
      const rows = output?.captions;
      if (Array.isArray(rows)) this.widgets?.find((w) => w.name === "caption_editor")?.editor?.show(rows);
      return result;
    };
  },
});
