// Live training view on the Train LoRA node: loss chart (raw, smoothed, validation points),
// step / total, it/s, ETA, learning rate and the latest sample preview. Fed by the trainer's
// "lora_foundry.train" events; a reloaded page asks /lora_foundry/train_state for the run so far.
// The node's optional inputs (its advanced settings) fold away behind a toggle in this view, so the
// chart sits right under the required settings; node.properties keeps the choice in the workflow.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { addStyle, apiURL, el, getJSON, nodeElement, setWidgetsHidden, vueNodes } from "./lib/common.js";

// Whether a widget's input is linked: through the frontend's connectivity helper (newer frontends deprecate reading
// input.link), the slot's own link where there is none.
function widgetLinked(node, widget) {
  const slot = node.getSlotFromWidget?.(widget);
  if (!slot) return false;
  const index = node.inputs?.indexOf(slot) ?? -1;
  if (index >= 0 && typeof node.isInputConnected === "function") return node.isInputConnected(index);
  return slot.link != null;
}

const TRAIN_NODE = "LoraFoundryTrainLoRA";
const HEIGHT = 300;
const SHOW_ADVANCED = "show_advanced_settings"; // node.properties key; absent or false: folded
const states = new Map(); // node id -> state, also for events that arrive before the node exists

function newState(total = 0) {
  return { steps: [], loss: [], validation: [], total, step: 0, lr: null, elapsed: 0, eta: null, rate: null,
    recent: [], preview: 0, status: "idle", memory: null, best: null };
}

function stateFor(id) {
  const key = String(id);
  if (!states.has(key)) states.set(key, newState());
  return states.get(key);
}

function smooth(values) {
  const out = [];
  const alpha = Math.min(0.3, 10 / Math.max(10, values.length));
  let ema = values[0];
  for (const v of values) {
    ema = alpha * v + (1 - alpha) * ema;
    out.push(ema);
  }
  return out;
}

function clock(seconds) {
  if (seconds === null || seconds === undefined || !Number.isFinite(seconds)) return "-";
  const s = Math.round(seconds);
  const h = Math.floor(s / 3600);
  const m = Math.floor((s % 3600) / 60);
  const pad = (n) => String(n).padStart(2, "0");
  return h ? `${h}:${pad(m)}:${pad(s % 60)}` : `${m}:${pad(s % 60)}`;
}

function onEvent(detail) {
  const state = stateFor(detail.node);
  if (detail.step <= state.step) Object.assign(state, newState(detail.total)); // a new run on this node
  state.status = "running";
  state.total = detail.total;
  state.step = detail.step;
  state.steps.push(detail.step);
  state.loss.push(detail.loss);
  const val = detail.validation;
  if (val !== null && val !== undefined && (!state.validation.length || state.validation.at(-1)[1] !== val)) {
    state.validation.push([detail.step, val]);
  }
  state.lr = detail.lr;
  state.elapsed = detail.elapsed;
  state.eta = detail.eta;
  state.memory = detail.memory_gb ?? null; // the run's planned peak device memory
  state.recent.push([detail.step, detail.elapsed]);
  if (state.recent.length > 20) state.recent.shift();
  const [s0, t0] = state.recent[0];
  state.rate = state.recent.length > 1 && detail.elapsed > t0 ? (detail.step - s0) / (detail.elapsed - t0)
    : detail.elapsed > 0 ? detail.step / detail.elapsed : null;
  if (detail.preview) state.preview = detail.preview;
  state.best = detail.best ?? state.best; // [step, held-out loss] of the best adapter so far
  if (detail.step >= detail.total) state.status = "finished";
  if (detail.stopped_early) state.status = "stopped early";
  views.get(String(detail.node))?.update();
}

class TrainView {
  constructor(node) {
    this.node = node;
    // widget-expands: in Nodes 2.0 this widget's row takes the height the node has beyond its content
    this.element = el("div", "lf-train widget-expands");
    this.fold = el("button", "lf-train-fold");
    this.fold.onclick = () => this.setAdvancedShown(!this.advancedShown);
    this.stats = el("div", "lf-train-stats");
    this.canvas = el("canvas", "lf-train-chart");
    this.image = el("img", "lf-train-preview");
    this.image.alt = "";
    this.element.append(this.fold, this.stats, this.canvas, this.image);
    this.shownPreview = 0;
    this.draws = 0;
    this.widget = node.addDOMWidget("live_training", "lora_foundry_train", this.element, {
      serialize: false,
      hideOnZoom: false,
      getValue: () => "",
      setValue: () => {},
      getMinHeight: () => HEIGHT,
    });
    this.widget.serialize = false;
    this.widget.view = this;
    new ResizeObserver(() => this.draw()).observe(this.canvas);
  }

  get state() {
    return stateFor(this.node.id);
  }

  // The widgets of the node's optional inputs, and the widgets they own (such as a seed's control).
  optionalWidgets() {
    const optional = new Set(Object.keys(this.node.constructor.nodeData?.input?.optional ?? {}));
    return (this.node.widgets ?? []).filter((w) => optional.has(w.name)).flatMap((w) => [w, ...(w.linkedWidgets ?? [])]);
  }

  get advancedShown() {
    return Boolean(this.node.properties?.[SHOW_ADVANCED]);
  }

  setAdvancedShown(shown) {
    app.canvas?.emitBeforeChange?.(); // one undoable change of the workflow, saved with it
    this.node.properties ??= {};
    this.node.properties[SHOW_ADVANCED] = shown;
    this.applyFold(true);
    app.canvas?.emitAfterChange?.();
  }

  // Hide or show the advanced widgets; with `resize`, fit the node's height to what is shown.
  applyFold(resize) {
    const shown = this.advancedShown;
    const linked = (w) => widgetLinked(this.node, w);
    const optional = this.optionalWidgets();
    const widgets = optional.filter((w) => !linked(w));
    setWidgetsHidden(this.node, optional.filter(linked), false); // a linked one shows where its link goes
    setWidgetsHidden(this.node, widgets, !shown);
    this.fold.textContent = `${shown ? "\u25be" : "\u25b8"} advanced settings (${widgets.length})`;
    this.fold.title = shown ? "Fold the optional settings away" : "Show the optional settings";
    if (!resize) return;
    const [width, height] = this.node.size;
    const need = this.node.computeSize()[1];
    this.node.setSize([width, shown ? Math.max(height, need) : need]);
    if (vueNodes()) nodeElement(this.node)?.style.setProperty("--node-height", "0px"); // its content's height
    this.node.setDirtyCanvas?.(true, true);
  }

  update() {
    const s = this.state;
    const last = s.loss.at(-1);
    const parts = s.step
      ? [`${s.status === "running" ? "" : `${s.status} \u00b7 `}step ${s.step}/${s.total}`,
        s.rate ? `${s.rate >= 1 ? s.rate.toFixed(2) + " it/s" : (1 / s.rate).toFixed(2) + " s/it"}` : null,
        s.status === "running" ? `ETA ${clock(s.eta)}` : `${clock(s.elapsed)}`,
        s.lr !== null ? `lr ${Number(s.lr).toExponential(2)}` : null,
        s.memory !== null ? `est. ${s.memory.toFixed(2)} GB` : null,
        last !== undefined ? `loss ${last.toFixed(4)}` : null,
        s.validation.length ? `val ${s.validation.at(-1)[1].toFixed(4)}` : null,
        s.best ? `best ${s.best[1].toFixed(4)} @ ${s.best[0]}` : null]
      : ["waiting for training\u2026"];
    this.stats.textContent = parts.filter(Boolean).join("  \u00b7  ");
    if (s.preview && s.preview !== this.shownPreview) {
      this.shownPreview = s.preview;
      this.image.src = apiURL(`/lora_foundry/train_preview?node=${encodeURIComponent(this.node.id)}&n=${s.preview}`);
    }
    this.image.style.display = s.preview ? "" : "none";
    this.draw();
  }

  draw() {
    const canvas = this.canvas;
    const ratio = window.devicePixelRatio || 1;
    const w = canvas.clientWidth;
    const h = canvas.clientHeight;
    if (!w || !h) return;
    canvas.width = Math.round(w * ratio);
    canvas.height = Math.round(h * ratio);
    const ctx = canvas.getContext("2d");
    ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
    ctx.fillStyle = "rgba(0,0,0,0.25)";
    ctx.fillRect(0, 0, w, h);
    const s = this.state;
    this.draws += 1;
    if (!s.loss.length) return;
    const values = s.loss.concat(s.validation.map((v) => v[1])).filter(Number.isFinite);
    let lo = Math.min(...values);
    let hi = Math.max(...values);
    if (hi - lo < 1e-12) { hi += 1e-3; lo -= 1e-3; }
    const pad = { l: 40, r: 6, t: 6, b: 14 };
    const x = (step) => pad.l + ((step - 1) / Math.max(1, s.total - 1)) * (w - pad.l - pad.r);
    const y = (v) => pad.t + (1 - (v - lo) / (hi - lo)) * (h - pad.t - pad.b);
    ctx.fillStyle = "rgba(255,255,255,0.6)";
    ctx.font = "10px sans-serif";
    ctx.fillText(hi.toPrecision(3), 2, pad.t + 8);
    ctx.fillText(lo.toPrecision(3), 2, h - pad.b);
    ctx.fillText(`${s.total} steps`, w - pad.r - 50, h - 2);
    const line = (ys, style, width) => {
      ctx.strokeStyle = style;
      ctx.lineWidth = width;
      ctx.beginPath();
      ys.forEach((v, i) => (i ? ctx.lineTo(x(s.steps[i]), y(v)) : ctx.moveTo(x(s.steps[i]), y(v))));
      ctx.stroke();
    };
    line(s.loss, "rgba(150,170,200,0.45)", 1);
    line(smooth(s.loss), "#4da3ff", 2);
    ctx.fillStyle = "#ffa640";
    for (const [step, v] of s.validation) {
      ctx.beginPath();
      ctx.arc(x(step), y(v), 3, 0, 2 * Math.PI);
      ctx.fill();
    }
    if (s.best) { // the best adapter so far: a ring, and a dashed line at its step
      ctx.strokeStyle = "#5fdc7a";
      ctx.lineWidth = 2;
      ctx.beginPath();
      ctx.arc(x(s.best[0]), y(s.best[1]), 6, 0, 2 * Math.PI);
      ctx.stroke();
      ctx.setLineDash([3, 3]);
      ctx.lineWidth = 1;
      ctx.beginPath();
      ctx.moveTo(x(s.best[0]), pad.t);
      ctx.lineTo(x(s.best[0]), h - pad.b);
      ctx.stroke();
      ctx.setLineDash([]);
    }
  }

  async restore() {
    if (this.node.id === undefined || this.node.id < 0) return;
    const run = await getJSON(`/lora_foundry/train_state?node=${encodeURIComponent(this.node.id)}`).catch(() => null);
    const state = stateFor(this.node.id);
    if (run && run.steps.length >= state.steps.length) {
      const last = run.last || {};
      Object.assign(state, newState(run.total), {
        steps: run.steps, loss: run.loss, validation: run.validation, step: last.step ?? 0, lr: last.lr ?? null,
        elapsed: last.elapsed ?? 0, eta: last.eta ?? null, preview: run.preview, memory: last.memory_gb ?? null,
        rate: last.elapsed ? last.step / last.elapsed : null, best: last.best ?? null,
        status: last.stopped_early ? "stopped early" : run.done ? "finished" : "running",
      });
    }
    this.update();
  }
}

const views = new Map(); // node id -> TrainView

function viewOf(node) {
  return node.widgets?.find((w) => w.name === "live_training")?.view;
}

function track(node) {
  const view = viewOf(node);
  if (view && node.id >= 0) views.set(String(node.id), view);
  return view;
}

function markStopped(nodeId, status) {
  const state = states.get(String(nodeId));
  if (state?.status === "running") {
    state.status = status;
    views.get(String(nodeId))?.update();
  }
}

const STYLE = `
.lf-train { box-sizing: border-box; width: 100%; height: 100%; display: flex; flex-direction: column; gap: 4px;
  padding: 2px 4px; font: 11px sans-serif; color: var(--input-text, #ddd); }
.lg-node .lf-train { min-height: ${HEIGHT}px; contain: inline-size; } /* Nodes 2.0: as wide as the node, never wider */
.lf-train-fold { flex: 0 0 auto; align-self: flex-start; padding: 1px 6px; font: inherit; color: inherit; cursor: pointer;
  background: var(--comfy-input-bg, #222); border: 1px solid var(--border-color, #444); border-radius: 4px; }
.lf-train-stats { flex: 0 0 auto; white-space: nowrap; overflow: hidden; text-overflow: ellipsis; }
.lf-train-chart { flex: 1 1 120px; width: 100%; min-height: 80px; border-radius: 4px; }
.lf-train-preview { flex: 0 1 auto; max-width: 100%; max-height: 45%; object-fit: contain; align-self: center; image-rendering: pixelated; }
`;

app.registerExtension({
  name: "LoraFoundry.TrainView",
  setup() {
    addStyle("lora-foundry-train-style", STYLE);
    api.addEventListener("lora_foundry.train", ({ detail }) => onEvent(detail));
    api.addEventListener("execution_error", ({ detail }) => markStopped(detail.node_id, "failed"));
    api.addEventListener("execution_interrupted", ({ detail }) => markStopped(detail.node_id, "cancelled"));
  },
  nodeCreated(node) {
    if (node.comfyClass !== TRAIN_NODE) return;
    node.properties ??= {};
    node.properties[SHOW_ADVANCED] ??= false;
    new TrainView(node).applyFold(true); // a new node: folded, and only as tall as what it shows
    const configure = node.onConfigure;
    node.onConfigure = function (info) {
      const result = configure?.apply(this, arguments);
      // From a workflow: its choice and size; one saved before the fold existed gets folded and fitted.
      viewOf(this)?.applyFold(info?.properties?.[SHOW_ADVANCED] === undefined);
      return result;
    };
    const connections = node.onConnectionsChange;
    node.onConnectionsChange = function () {
      const result = connections?.apply(this, arguments);
      viewOf(this)?.applyFold(false); // a setting linked to another node shows, folded or not
      return result;
    };
    const added = node.onAdded;
    node.onAdded = function () {
      const result = added?.apply(this, arguments);
      track(this)?.update();
      return result;
    };
    const executed = node.onExecuted;
    node.onExecuted = function (output) {
      const result = executed?.apply(this, arguments);
      const state = stateFor(this.id);
      if (Array.isArray(output?.loss)) {
        state.loss = output.loss;
        state.steps = output.loss.map((_, i) => i + 1);
        state.validation = output.validation ?? state.validation;
        state.total = Math.max(state.total, output.loss.length);
        state.step = output.loss.length;
      }
      if (state.status !== "stopped early") state.status = "finished";
      track(this)?.update();
      return result;
    };
  },
  loadedGraphNode(node) {
    if (node.comfyClass === TRAIN_NODE) track(node)?.restore();
  },
});
