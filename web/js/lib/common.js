// Helpers shared by the Lora Foundry extensions. ComfyUI loads every .js file under the web
// directory as an extension, this one too: it only exports, so loading it on its own does nothing.
import { api } from "../../../scripts/api.js";

// An element with an optional class name and text. Text is only ever set as text, never as HTML:
// much of it comes from files someone else made.
export function el(tag, cls, text) {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  if (text !== undefined && text !== null) node.textContent = String(text);
  return node;
}

// A <style> element with this id in the page's head; added once, however often it is asked for.
export function addStyle(id, css) {
  if (document.getElementById(id)) return;
  const style = el("style");
  style.id = id;
  style.textContent = css;
  document.head.append(style);
}

// GET (or `options.method`) one of the server's routes and parse its JSON body; throws an Error with
// the route's `error` message, or the HTTP status, when it is not ok.
export async function getJSON(route, options) {
  const resp = await api.fetchApi(route, options);
  const body = await resp.json().catch(() => null);
  if (!resp.ok) throw new Error(body?.error || `HTTP ${resp.status}`);
  return body;
}

// The URL of one of the server's routes, for <img src> and the like.
export const apiURL = (route) => api.apiURL(route);

// Whether the frontend draws nodes as Vue components ("Nodes 2.0") instead of on the LiteGraph canvas.
export const vueNodes = () => Boolean(globalThis.LiteGraph?.vueNodesMode);

// The element of a node in Nodes 2.0 (null on the classic canvas, or before Vue has mounted it).
export const nodeElement = (node) => document.querySelector(`.lg-node[data-node-id="${CSS.escape(String(node.id))}"]`);

// Hide or show widgets of a node in both renderers, without removing them from node.widgets (where
// their position is what a saved workflow's widgets_values refers to). The classic canvas skips
// `hidden` widgets and lays them out at computeSize's height; Nodes 2.0 skips `options.hidden` ones,
// and only notices when the node's (reactive) widget list changes.
const HIDDEN_SIZE = () => [0, -4];
export function setWidgetsHidden(node, widgets, hidden) {
  let changed = false;
  for (const w of widgets) {
    if (Boolean(w.hidden) === hidden) continue;
    changed = true;
    w.hidden = hidden;
    w.options = w.options ?? {};
    w.options.hidden = hidden;
    if (hidden) {
      if (Object.hasOwn(w, "computeSize")) w.lfComputeSize = w.computeSize;
      w.computeSize = HIDDEN_SIZE;
    } else if (w.computeSize === HIDDEN_SIZE) {
      if (w.lfComputeSize) w.computeSize = w.lfComputeSize;
      else delete w.computeSize;
      delete w.lfComputeSize;
    }
  }
  if (changed && node.widgets?.length) node.widgets.push(node.widgets.pop()); // same list: Vue re-reads it
  return changed;
}
