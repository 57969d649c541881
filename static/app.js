// Page wiring: the text box and token chips, the tabs and their views, their exports.
import * as api from "./api.js";
import { attentionView } from "./attention.js";
import { attributionView } from "./attribution.js";
import { compareModels, compareView } from "./compare.js";
import { $, make, options, range } from "./dom.js";
import { provenanceOf, saveJSON, savePNG, saveSVG } from "./export.js";
import { featuresView } from "./features.js";
import { generateView } from "./generate.js";
import { headsView } from "./heads.js";
import { lensView } from "./lens.js";
import { patchingView } from "./patching.js";
import { ORANGES, inkOn, rgb, sequential, showToken } from "./svg.js";
import { tracingView } from "./tracing.js";
import { trajectoriesView } from "./trajectories.js";

// Every tab, in tab order: its panel is #panel-NAME in index.html, its view is made by its
// module's function from `page` (see `register`). A view is
//   key()      names the data its figure needs (a changed key refetches, the same key only redraws)
//   request()  fetches that data (null: nothing to draw yet)
//   draw(data, readout)  makes the figure
//   name()     the download name
//   controls   (optional) selectors of the panel's inputs whose change redraws it
// and its module wires any other control of its panel when it makes it.
const TABS = {
  trajectories: trajectoriesView, attention: attentionView, lens: lensView, heads: headsView,
  dla: attributionView, patching: patchingView, tracing: tracingView, generate: generateView, features: featuresView,
  compare: compareView,
};

// text: the analysed text as shown; source: as the views send it, that string, or in token-ids
// mode (a generated sequence, see `inspect`) an api.TokenIds; selected: the position the views'
// position selectors start at.
const state = { model: null, models: [], text: "", source: "", ids: null, selected: null, tokens: [], traced: new Set() };
const views = {};

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

function activeView() {
  return $('[role="tab"][aria-selected="true"]').id.replace("tab-", "");
}

async function show(name) {
  const view = views[name];
  const box = view.panel.querySelector(".figure-box");
  if (!state.source) return;
  const key = `${state.source.ids ? `ids ${state.source.ids}` : state.text}\n${view.key()}`;
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

// A causal model's BOS is labelled so (its string, e.g. <|endoftext|>, reads as the end of a text);
// an encoder's [CLS] keeps its name.
const isBos = (index, id) => index === 0 && id === state.model?.bos_token_id && state.model?.causal !== false;

function renderChips() {
  $("#token-count").textContent = state.tokens.length ? `${state.tokens.length} tokens` : "";
  $("#chips").replaceChildren(...state.tokens.map((t) => {
    const bos = isBos(t.index, t.token_id);
    const chip = make("button", {
      type: "button",
      className: bos ? "chip bos" : "chip",
      textContent: bos ? "BOS" : showToken(t.token_str, 24),
      title: `#${t.index} · id ${t.token_id} · ${JSON.stringify(t.token_str)}${bos ? " (beginning of sequence)" : ""}`,
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
  const source = state.source;
  if (!$("#surprisal").checked || !source) return;
  const result = await busy($("#tokens"), () => api.score([source]), "surprisal", () => state.source === source);
  if (!result || state.source !== source || !$("#surprisal").checked) return;
  const surprisal = result.results[0].token_logprobs.map((lp) => (lp === null ? null : -lp));
  const scale = sequential(Math.max(...surprisal.filter((s) => s !== null), 1e-9), { stops: ORANGES });
  chips.forEach((chip, i) => {
    if (surprisal[i] === null) return;  // the first token has no prefix to be surprised by
    const colour = scale.colour(surprisal[i]);
    chip.style.background = rgb(colour);
    chip.style.color = inkOn(colour);
    chip.dataset.surprisal = surprisal[i];
    chip.title = `${chip.dataset.title} · surprisal ${surprisal[i].toFixed(3)} nats`;
  });
  const ramp = make("span", { className: "ramp" });
  ramp.style.background = `linear-gradient(to right, ${[0, 0.25, 0.5, 0.75, 1].map((t) => rgb(scale.colour(t * scale.hi))).join(", ")})`;
  legend.replaceChildren("surprisal 0", ramp, `${scale.hi.toFixed(2)} nats (${scale.note})`);
  legend.title = "surprisal = -log P(token | the tokens before it), from POST /score";
  legend.hidden = false;
}

let analyzing = 0;

// Token-ids mode: the views analyse a generated sequence as its ids, at `position`; the text box
// shows its decoded text, and any change to that text leaves the mode.
function inspect(ids, text, position) {
  $("#text").value = text;
  state.ids = new api.TokenIds(ids, $("#text").value);  // as the box keeps it (line ends normalized)
  state.selected = position;
  analyze();
}

// Whether the views show the sequence `inspect` set (the mode is left at once, the views change
// with the next analysis).
const inIdsMode = () => state.ids !== null && state.source === state.ids;

function showIdsMode() {
  $("#ids-mode").hidden = !inIdsMode();
  if (!inIdsMode()) return;
  const t = state.tokens[state.selected];
  $("#ids-mode-what").textContent = `Token ids: the generated sequence's ${state.ids.ids.length} tokens as ` +
    `generated (not re-tokenized), #${t.index} ${JSON.stringify(t.token_str)} selected.`;
}

function leaveIdsMode() {
  state.ids = state.selected = null;
  showIdsMode();
}

async function analyze() {
  const text = $("#text").value;
  if (state.ids?.text !== text) leaveIdsMode();
  const source = state.ids ?? text;
  const run = ++analyzing;
  clearError();
  const result = await busy($("#tokens"), () => api.tokenize(source), "tokens", () => run === analyzing);
  if (run !== analyzing) return;
  state.text = result ? text : "";
  state.source = result ? source : "";
  state.tokens = result ? result.tokens : [];
  // Same default as /trace: the text's own tokens (no BOS; for an encoder, no [CLS] or [SEP]).
  const first = state.model?.prepends_bos ? 1 : 0;
  const end = state.tokens.length - (state.model?.causal === false ? 1 : 0);
  const own = state.tokens.slice(first, end).map((t) => t.index);
  state.traced = new Set(own.length ? own : [0]);
  const positions = state.tokens.map((t) => [String(t.index), `#${t.index} ${showToken(t.token_str, 20)}`]);
  const selected = String(inIdsMode() ? state.selected : state.tokens.length - 1);
  document.querySelectorAll("select.positions").forEach((s) => options(s, positions, selected));
  showIdsMode();
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

const FORMATS = {
  png: (view) => savePNG(view.figure, provenanceOf(view.data), `${view.name()}.png`),
  svg: (view) => saveSVG(view.figure, provenanceOf(view.data), `${view.name()}.svg`),
  json: (view) => saveJSON(view.name(), view.data, `${view.name()}.json`),
};

// The one way a tab is added: its tab button (arrow keys move between tabs), and what every
// panel has besides its own controls: a loading indicator, downloads, the figure and a readout.
function register(name, view) {
  const panel = $(`#panel-${name}`);
  const tab = make("button", { type: "button", id: `tab-${name}`, textContent: panel.dataset.tab },
                   { role: "tab", "aria-controls": panel.id });
  tab.addEventListener("click", () => selectTab(tab));
  tab.addEventListener("keydown", (event) => {
    const step = { ArrowLeft: -1, ArrowRight: 1 }[event.key];
    if (!step) return;
    const tabs = [...document.querySelectorAll('[role="tab"]:not([hidden])')];
    const next = tabs[(tabs.indexOf(tab) + step + tabs.length) % tabs.length];
    next.focus();
    selectTab(next);
  });
  $('[role="tablist"]').append(tab);
  panel.setAttribute("role", "tabpanel");
  panel.setAttribute("aria-labelledby", tab.id);
  const exports = make("span", { className: "exports" });
  exports.append(...Object.entries(FORMATS).map(([format, save]) => {
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
  panel.querySelector(".toolbar").append(
    make("span", { className: "loading", textContent: "Loading…" }, { role: "status" }), exports);
  panel.append(make("div", { className: "figure-box" }), make("p", { className: "readout" }, { "aria-live": "polite" }));
  for (const control of view.controls ?? []) $(control).addEventListener("change", () => show(name));
  views[name] = Object.assign(view, { panel });
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
  options($("#gen-layer"), range(info.n_layers, "L"), "0");
}

// Several models: the selector (every view asks the chosen one) and the Compare tab.
function setUpModels(listing) {
  state.models = listing.models;
  const several = listing.models.length > 1;
  $("#model-choice").hidden = $("#tab-compare").hidden = !several;
  if (!several) return;
  options($("#model-select"), listing.models.map((m) => [m.name, m.name]), listing.default);
  compareModels(listing.models);
}

async function start() {
  for (const [name, makeView] of Object.entries(TABS)) {
    register(name, makeView({
      text: () => state.source, tokens: () => state.tokens, traced: () => state.traced, models: () => state.models,
      redraw: () => show(name), isBos, inspect,
      selected: () => (inIdsMode() ? { ids: state.ids.ids, position: state.selected } : null),
    }));
  }
  selectTab($('[role="tab"]'));
  $("#tab-compare").hidden = true;  // until GET /models lists several
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
  $("#surprisal").addEventListener("change", colourSurprisal);
  $("#text").addEventListener("input", () => { if (state.ids && $("#text").value !== state.ids.text) leaveIdsMode(); });
  $("#ids-mode-leave").addEventListener("click", () => {
    leaveIdsMode();
    analyze();
  });
  $("#model-select").addEventListener("change", () => {
    api.chooseModel($("#model-select").value);
    state.model = state.models.find((m) => m.name === $("#model-select").value);
    showModel(state.model);
    leaveIdsMode();  // another model: another vocabulary
    analyze();
  });
  const listing = await busy($("#model"), api.getModels, "model");
  if (listing) {
    setUpModels(listing);
    state.model = listing.models.find((m) => m.name === listing.default);
    showModel(state.model);
    analyze();
  }
}

start();
