// Page wiring: the text box and token chips, the views, their exports.
import * as api from "./api.js";
import { tokenSpec } from "./api.js";
import { drawAttention } from "./attention.js";
import { drawAttribution } from "./attribution.js";
import { drawCompare } from "./compare.js";
import { saveJSON, savePNG, saveSVG } from "./export.js";
import { headsView, setUpHeads } from "./heads.js";
import { drawLens } from "./lens.js";
import { drawLensGrid } from "./lensgrid.js";
import { patchingView } from "./patching.js";
import { inkOn, oranges, rgb, showToken } from "./svg.js";
import { tracingView } from "./tracing.js";
import { drawTrajectories } from "./trajectories.js";

const $ = (selector) => document.querySelector(selector);

// An element with properties, then attributes (for the ARIA ones that have no property).
function make(tag, props, attrs = {}) {
  const node = Object.assign(document.createElement(tag), props);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, value);
  return node;
}

const state = { model: null, models: [], text: "", tokens: [], traced: new Set() };

// The banner shows the latest failure; `source` names what failed (a view, "tokens", ...) so
// that the next success of the same source clears it, and nothing else does.
function showError(err, source) {
  $("#error").textContent = err.message;
  $("#error").dataset.source = source;
  $("#error").hidden = false;
}

function clearError(source = null) {
  if (source === null || $("#error").dataset.source === source) $("#error").hidden = true;
}

// Marks `box` busy (its loading indicator shows) while `work` runs; its error goes to the page
// unless `current()` says a newer request of the same source took over (a stale failure must
// not cover a newer answer). Counted, so that an overtaken request finishing does not end a
// newer one's indicator.
async function busy(box, work, source, current = () => true) {
  box.dataset.pending = Number(box.dataset.pending ?? 0) + 1;
  box.setAttribute("aria-busy", "true");
  try {
    const result = await work();
    if (current()) clearError(source);
    return result;
  } catch (err) {
    if (current()) showError(err, source);
    return null;
  } finally {
    box.dataset.pending -= 1;
    box.setAttribute("aria-busy", box.dataset.pending !== "0");
  }
}

// The lens grid reads at most this many positions per request: a window around the selected one.
const GRID_POSITIONS = 96;

const lensGrid = () => $("#lens-mode").value === "grid";

// Positions the grid asks for (undefined: every position), centred on the selected one.
function gridPositions() {
  const n = state.tokens.length;
  if (n <= GRID_POSITIONS) return undefined;
  const start = Math.min(Math.max(Number($("#lens-pos").value) - GRID_POSITIONS / 2, 0), n - GRID_POSITIONS);
  return Array.from({ length: GRID_POSITIONS }, (_, i) => start + i);
}

function options(select, items, selected) {
  select.replaceChildren(...items.map(([value, label]) => new Option(label, value, false, value === selected)));
}

// Each view: `key` names the request its figure needs (a changed key refetches, the same key
// only redraws), `request` fetches it, `draw` makes the figure, `name` is the download name.
const views = {
  trajectories: {
    key: () => [...state.traced].join(","),
    request: () => api.trace(state.text, [...state.traced].sort((a, b) => a - b)),
    draw: drawTrajectories,
    name: () => "trajectories",
  },
  attention: {
    key: () => $("#attn-layer").value,
    request: () => api.attention(state.text, Number($("#attn-layer").value)),
    draw: (data, readout) => drawAttention(data, Number($("#attn-head").value), readout, (head) => {
      $("#attn-head").value = head;
      show("attention");
      views.attention.panel.querySelector(`[data-head="${head}"]`)?.focus();
    }),
    name: () => `attention-L${$("#attn-layer").value}-H${$("#attn-head").value}`,
  },
  lens: {
    // The grid refetches only for another window or target: shade and position just redraw.
    key: () => (lensGrid() ? `grid/${gridPositions()}/${$("#lens-target").value}`
                           : `${$("#lens-pos").value}/${$("#lens-k").value}`),
    request: () => (lensGrid()
      ? api.lens(state.text, { positions: gridPositions(), target: tokenSpec($("#lens-target").value), top_k: 5 })
      : api.predict(state.text, Number($("#lens-pos").value), Number($("#lens-k").value))),
    draw: (data, readout) => (lensGrid()
      ? drawLensGrid(data, readout, {
        shade: $("#lens-shade").value,
        position: Number($("#lens-pos").value),
        select: (position) => {
          $("#lens-pos").value = String(position);
          show("lens");
        },
      })
      : drawLens(data, readout)),
    name: () => (lensGrid() ? "lens-grid" : `lens-pos${$("#lens-pos").value}`),
  },
  dla: {
    key: () => `${$("#dla-pos").value}/${$("#dla-answer").value}/${$("#dla-distractor").value}`,
    // No answer typed: attribute the model's own top-1 next token at that position.
    request: async () => {
      const position = Number($("#dla-pos").value);
      const answer = tokenSpec($("#dla-answer").value)
        ?? (await api.predict(state.text, position, 1)).predictions_by_layer.at(-1).top_tokens[0].token_id;
      return api.dla(state.text, answer, tokenSpec($("#dla-distractor").value) ?? null, position);
    },
    draw: drawAttribution,
    name: () => `dla-pos${$("#dla-pos").value}`,
  },
  heads: headsView(() => state.text),
  patching: patchingView(),
  tracing: tracingView(),
  compare: {
    key: () => `${$("#cmp-a").value}/${$("#cmp-b").value}/${$("#cmp-layer").value}/${gridPositions()}`,
    request: () => Promise.all([$("#cmp-a").value, $("#cmp-b").value].map(async (model) => ({
      model,
      lens: await api.lens(state.text, { positions: gridPositions(), top_k: 5, model }),
      attention: await api.attention(state.text, Number($("#cmp-layer").value), null, model),
    }))),
    draw: (data, readout) => drawCompare(data, readout, {
      head: Number($("#cmp-head").value),
      shade: $("#cmp-shade").value,
      selectHead: (head) => {
        $("#cmp-head").value = head;
        show("compare");
      },
    }),
    name: () => `compare-${$("#cmp-a").value}-${$("#cmp-b").value}-L${$("#cmp-layer").value}-H${$("#cmp-head").value}`,
  },
};

function activeView() {
  return $('[role="tab"][aria-selected="true"]').id.replace("tab-", "");
}

async function show(name) {
  const view = views[name];
  const box = view.panel.querySelector(".figure-box");
  if (!state.text) return;
  const key = `${state.text}\n${view.key()}`;
  if (view.dataKey !== key) {
    view.dataKey = key;
    view.data = null;
    const data = await busy(view.panel, view.request, name, () => view.dataKey === key);
    if (view.dataKey !== key) return;  // a newer request took over while this one ran
    view.data = data;
    if (!data) view.dataKey = null;  // failed: the next show() retries
  }
  view.figure = view.data && view.draw(view.data, view.panel.querySelector(".readout"));
  box.replaceChildren(...(view.figure ? [view.figure] : []));
  view.panel.querySelectorAll(".exports button").forEach((b) => { b.disabled = !view.figure; });
}

function renderChips() {
  const bos = state.model?.bos_token_id;
  $("#token-count").textContent = state.tokens.length ? `${state.tokens.length} tokens` : "";
  $("#chips").replaceChildren(...state.tokens.map((t) => {
    const isBos = t.index === 0 && t.token_id === bos && state.model?.causal !== false;  // BERT: show [CLS]
    const chip = make("button", {
      type: "button",
      className: isBos ? "chip bos" : "chip",
      textContent: isBos ? "BOS" : showToken(t.token_str, 24),
      title: `#${t.index} · id ${t.token_id} · ${JSON.stringify(t.token_str)}${isBos ? " (beginning of sequence)" : ""}`,
    }, { "aria-pressed": state.traced.has(t.index) });
    chip.dataset.title = chip.title;
    chip.addEventListener("click", () => {
      if (state.traced.has(t.index) && state.traced.size === 1) return;  // trace needs a token
      state.traced.has(t.index) ? state.traced.delete(t.index) : state.traced.add(t.index);
      chip.setAttribute("aria-pressed", state.traced.has(t.index));
      if (activeView() === "trajectories") show("trajectories");
    });
    return chip;
  }));
}

// Token chips coloured by surprisal, -log P(token | prefix) from /score, with a legend.
async function colourSurprisal() {
  const chips = [...document.querySelectorAll("#chips .chip")];
  const legend = $("#surprisal-legend");
  for (const chip of chips) {
    chip.style.background = chip.style.color = "";
    chip.title = chip.dataset.title ?? chip.title;
    delete chip.dataset.surprisal;
  }
  legend.hidden = true;
  const text = state.text;
  if (!$("#surprisal").checked || !text) return;
  const result = await busy($("#tokens"), () => api.score([text]), "surprisal", () => state.text === text);
  if (!result || state.text !== text || !$("#surprisal").checked) return;
  const surprisal = result.results[0].token_logprobs.map((lp) => (lp === null ? null : -lp));
  const max = Math.max(...surprisal.filter((s) => s !== null), 1e-9);
  chips.forEach((chip, i) => {
    if (surprisal[i] === null) return;  // the first token has no prefix to be surprised by
    const colour = oranges(surprisal[i] / max);
    chip.style.background = rgb(colour);
    chip.style.color = inkOn(colour);
    chip.dataset.surprisal = surprisal[i];
    chip.title = `${chip.dataset.title} · surprisal ${surprisal[i].toFixed(3)} nats`;
  });
  const ramp = `linear-gradient(to right, ${[0, 0.25, 0.5, 0.75, 1].map((t) => rgb(oranges(t))).join(", ")})`;
  legend.replaceChildren("surprisal 0", Object.assign(document.createElement("span"), { className: "ramp" }),
                         `${max.toFixed(2)} nats`);
  legend.title = "surprisal = -log P(token | the tokens before it), from POST /score";
  legend.querySelector(".ramp").style.background = ramp;
  legend.hidden = false;
}

let analyzing = 0;

async function analyze() {
  const text = $("#text").value;
  const run = ++analyzing;
  clearError();
  const result = await busy($("#tokens"), () => api.tokenize(text), "tokens", () => run === analyzing);
  if (run !== analyzing) return;
  state.text = result ? text : "";
  state.tokens = result ? result.tokens : [];
  // Same default as /trace: the text's own tokens (no BOS; for an encoder, no [CLS] or [SEP]).
  const first = state.model?.prepends_bos ? 1 : 0;
  const end = state.tokens.length - (state.model?.causal === false ? 1 : 0);
  const own = state.tokens.slice(first, end).map((t) => t.index);
  state.traced = new Set(own.length ? own : [0]);
  const positions = state.tokens.map((t) => [String(t.index), `#${t.index} ${showToken(t.token_str, 20)}`]);
  options($("#lens-pos"), positions, String(state.tokens.length - 1));
  options($("#dla-pos"), positions, String(state.tokens.length - 1));
  renderChips();
  colourSurprisal();
  for (const view of Object.values(views)) {
    view.dataKey = view.data = view.figure = null;
    view.panel.querySelector(".figure-box").replaceChildren();
    view.panel.querySelector(".readout").textContent = "";
    view.panel.querySelectorAll(".exports button").forEach((b) => { b.disabled = true; });
  }
  show(activeView());
}

function selectTab(tab) {
  for (const other of document.querySelectorAll('[role="tab"]')) {
    const on = other === tab;
    other.setAttribute("aria-selected", on);
    other.tabIndex = on ? 0 : -1;
    $(`#${other.getAttribute("aria-controls")}`).hidden = !on;
  }
  show(activeView());
}

function setUpTabs() {
  for (const tab of document.querySelectorAll('[role="tab"]')) {
    tab.addEventListener("click", () => selectTab(tab));
    tab.addEventListener("keydown", (event) => {
      const step = { ArrowLeft: -1, ArrowRight: 1 }[event.key];
      if (!step) return;
      const tabs = [...document.querySelectorAll('[role="tab"]:not([hidden])')];
      const next = tabs[(tabs.indexOf(tab) + step + tabs.length) % tabs.length];
      next.focus();
      selectTab(next);
    });
  }
}

// What every view's panel has besides its own controls.
function setUpPanels() {
  const formats = {
    png: (view) => savePNG(view.figure, `${view.name()}.png`),
    svg: (view) => saveSVG(view.figure, `${view.name()}.svg`),
    json: (view) => saveJSON(view.data, `${view.name()}.json`),
  };
  for (const [name, view] of Object.entries(views)) {
    view.panel = $(`#panel-${name}`);
    const exports = make("span", { className: "exports" });
    view.panel.querySelector(".toolbar").append(
      make("span", { className: "loading", textContent: "Loading…" }, { role: "status" }), exports);
    view.panel.append(make("div", { className: "figure-box" }),
                      make("p", { className: "readout" }, { "aria-live": "polite" }));
    exports.append(...Object.entries(formats).map(([format, save]) => {
      const button = make("button", { type: "button", textContent: format.toUpperCase(), disabled: true },
                          { "data-export": format, "aria-label": `Download ${name} as ${format.toUpperCase()}` });
      button.addEventListener("click", async () => {
        try {
          await save(view);
        } catch (err) {
          showError(err, "export");
        }
      });
      return button;
    }));
  }
}

// The header chip of each `weights` state of GET /model; "local" shows its directory on hover.
const WEIGHT_CHIPS = { random: "RANDOM WEIGHTS", pretrained: "pretrained weights", local: "local weights" };

function showModel(info) {
  const random = info.weights === "random";
  const kind = info.weights in WEIGHT_CHIPS ? info.weights : "pretrained";
  $("#model").replaceChildren(
    make("strong", { textContent: info.name }),
    ` · ${info.family}${info.causal ? "" : " (encoder)"} · ${info.n_layers} layers · ${info.n_heads} heads`
      + (info.n_key_value_heads < info.n_heads ? ` (${info.n_key_value_heads} key/value)` : "")
      + ` · d_model ${info.d_model} · ${info.device} ${info.dtype} `,
    make("span", { className: `weights ${kind}`, textContent: WEIGHT_CHIPS[kind],
                   title: info.path ? `loaded from ${info.path}` : "" }),
  );
  $("#random-warning").hidden = !random;
  options($("#attn-layer"), range(info.n_layers, "L"), "0");
  options($("#attn-head"), range(info.n_heads, "H"), "0");
}

const range = (n, label) => Array.from({ length: n }, (_, i) => [String(i), `${label}${i}`]);

// Several models: the selector (every view asks the chosen one) and the Compare view's choices.
function setUpModels(listing) {
  state.models = listing.models;
  const several = listing.models.length > 1;
  $("#model-choice").hidden = $("#tab-compare").hidden = !several;
  if (!several) return;
  const names = listing.models.map((m) => [m.name, m.name]);
  options($("#model-select"), names, listing.default);
  options($("#cmp-a"), names, names[0][0]);
  options($("#cmp-b"), names, names[1][0]);
  compareChoices();
}

// Layers and heads both compared models have.
function compareChoices() {
  const pair = [$("#cmp-a").value, $("#cmp-b").value].map((n) => state.models.find((m) => m.name === n));
  const keep = (select, n, label) => options(select, range(n, label), String(Math.min(Number(select.value) || 0, n - 1)));
  keep($("#cmp-layer"), Math.min(...pair.map((m) => m.n_layers)), "L");
  keep($("#cmp-head"), Math.min(...pair.map((m) => m.n_heads)), "H");
}

async function start() {
  setUpTabs();
  setUpPanels();
  $("#input-form").addEventListener("submit", (event) => {
    event.preventDefault();
    analyze();
  });
  $("#text").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey) {
      event.preventDefault();
      analyze();
    }
  });
  $("#attn-layer").addEventListener("change", () => show("attention"));
  $("#attn-head").addEventListener("change", () => show("attention"));
  $("#lens-pos").addEventListener("change", () => show("lens"));
  $("#lens-k").addEventListener("change", () => show("lens"));
  setUpHeads(() => state.text, () => show("heads"));
  views.patching.setUp(() => show("patching"));
  views.tracing.setUp(() => show("tracing"));
  $("#lens-mode").addEventListener("change", () => {
    document.querySelectorAll("#panel-lens .grid-only").forEach((n) => { n.hidden = !lensGrid(); });
    document.querySelectorAll("#panel-lens .position-only").forEach((n) => { n.hidden = lensGrid(); });
    show("lens");
  });
  $("#lens-shade").addEventListener("change", () => show("lens"));
  $("#lens-target").addEventListener("change", () => show("lens"));
  for (const id of ["#dla-pos", "#dla-answer", "#dla-distractor"]) {
    $(id).addEventListener("change", () => show("dla"));
  }
  $("#surprisal").addEventListener("change", colourSurprisal);
  $("#model-select").addEventListener("change", () => {
    api.chooseModel($("#model-select").value);
    state.model = state.models.find((m) => m.name === $("#model-select").value);
    showModel(state.model);
    analyze();
  });
  for (const id of ["#cmp-a", "#cmp-b"]) {
    $(id).addEventListener("change", () => {
      compareChoices();
      show("compare");
    });
  }
  for (const id of ["#cmp-layer", "#cmp-head", "#cmp-shade"]) $(id).addEventListener("change", () => show("compare"));
  const listing = await busy($("#model"), api.getModels, "model");
  if (listing) {
    setUpModels(listing);
    state.model = listing.models.find((m) => m.name === listing.default);
    showModel(state.model);
    analyze();
  }
}

start();
