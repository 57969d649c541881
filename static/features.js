// Features view: the page's text read through a sparse autoencoder (POST /features, /feature).
// The tokens are chips coloured by the chosen feature's activation; hovering one lists its most
// active features (click one to choose it); the feature card shows the tokens its decoder
// direction promotes and suppresses, and two actions: ablate it (the effect on a target token's
// log-probability) and steer a short generation with it (beside the unsteered one). The
// reconstruction's quality on this text is stated above the figure.
import * as api from "./api.js";
import { tokenSpec } from "./api.js";
import { $, make, options } from "./dom.js";
import { ORANGES, colourBar, el, figure, fmt, inkOn, readable, rgb, sequential, showToken } from "./svg.js";

const COLS = 10, CELL_W = 84, CELL_H = 24, GAP = 4, TOP = 70, TOP_LISTED = 10;

let saes = [];  // GET /saes
const chosen = () => saes.find((s) => `${s.model}/${s.name}` === $("#feat-sae").value);

async function loadSaes() {
  saes = (await api.getSaes()).saes;
  options($("#feat-sae"), saes.map((s) => [`${s.model}/${s.name}`, `${s.name} (${s.hook}, ${s.d_sae} features)`]),
          saes.length ? `${saes[0].model}/${saes[0].name}` : undefined);
  $("#feat-none").hidden = saes.length > 0;
  $("#feat-index").max = String((chosen()?.d_sae ?? 1) - 1);
}

// The view (see app.js's TABS).
export function featuresView(page) {
  const ready = loadSaes().catch(() => { $("#feat-none").hidden = false; });
  const index = () => Number($("#feat-index").value);
  const choose = (i) => {
    $("#feat-index").value = String(i);
    $("#feat-result").textContent = "";
    page.redraw();
  };
  $("#feat-sae").addEventListener("change", () => {
    $("#feat-index").max = String((chosen()?.d_sae ?? 1) - 1);
    $("#feat-result").textContent = "";
  });
  $("#feat-ablate").addEventListener("click", () => act(async (sae) => {
    const answer = tokenSpec($("#feat-answer").value);
    if (answer === undefined) throw new Error("type a target token (e.g. \" mat\") to ablate the feature against");
    const r = await api.feature(page.text(), sae.name, index(), { answer, edit: "ablate" }, sae.model);
    const e = r.edit, result = e.results[0];
    return `ablating feature ${index()} everywhere: log P(${JSON.stringify(r.answer.token)}) `
      + `${fmt(e.clean_metric)} → ${fmt(result.metric)} (effect ${fmt(result.effect, { sign: true })})`;
  }));
  $("#feat-steer").addEventListener("click", () => act(async (sae) => {
    const r = await api.generate({
      prompt: page.text(), max_new_tokens: 12, compare: true, model: sae.model,
      steer: [{ vector: { kind: "feature", sae: sae.name, index: index() }, coefficient: Number($("#feat-coefficient").value) }],
    });
    return `steered with feature ${index()} × ${$("#feat-coefficient").value}: ${JSON.stringify(r.completion)}`
      + ` · unsteered: ${JSON.stringify(r.unsteered.completion)}`;
  }));

  // A button's action, its answer (or error) in the card's result line.
  async function act(work) {
    const sae = chosen(), out = $("#feat-result");
    if (!sae || !page.text()) return;
    out.textContent = "working…";
    try {
      out.textContent = await work(sae);
    } catch (err) {
      out.textContent = err.message;
    }
  }

  return {
    controls: ["#feat-sae", "#feat-index"],
    key: () => `${$("#feat-sae").value}/${index()}`,
    request: async () => {
      await ready;
      const sae = chosen();
      if (!sae) return null;
      const [read, one] = await Promise.all([api.features(page.text(), sae.name, TOP_LISTED, sae.model),
                                             api.feature(page.text(), sae.name, index(), {}, sae.model)]);
      const info = page.models().find((m) => m.name === sae.model);
      return { features: read, feature: one, bos: info?.causal === false ? null : info?.bos_token_id };
    },
    draw: (data, readout) => drawFeatures(data, readout, choose),
    name: () => `features-${$("#feat-sae").value.replace(/\W+/g, "_")}-${index()}`,
  };
}

function drawFeatures({ features, feature, bos }, readout, choose) {
  const tokens = features.tokens, acts = feature.activations;
  const rows = Math.ceil(tokens.length / COLS);
  const W = 16 + COLS * (CELL_W + GAP), cardY = TOP + rows * (CELL_H + GAP) + 44;
  const svg = figure(W, cardY + 74, `Feature ${feature.index} of ${features.sae.name}`);
  const q = features.reconstruction;
  svg.append(
    el("text", { x: 8, y: 20, "font-size": 14, "font-weight": 600 },
       `Feature ${feature.index} of ${features.sae.name} (${features.sae.hook}): max activation ${fmt(feature.max_activation)}`),
    el("text", { x: 8, y: 40, fill: "#555", class: "feat-quality" },
       `reconstruction on this text: ${fmt(q.variance_explained * 100, { decimals: 1 })}% of variance explained, `
       + `relative MSE ${fmt(q.relative_mse)}, ${fmt(q.l0, { decimals: 1 })} features active per token`),
    el("text", { x: 8, y: 58, fill: "#555", "font-size": 11 },
       "chip colour = this feature's activation; hover a token for its top features, click one to choose it"),
  );
  const scale = sequential(Math.max(feature.max_activation, 1e-9), { stops: ORANGES });
  const cells = tokens.map((t, i) => {
    const colour = scale.colour(acts[i]);
    const cell = el("g", { class: "feat-chip", transform: `translate(${8 + (i % COLS) * (CELL_W + GAP)} ${TOP + Math.floor(i / COLS) * (CELL_H + GAP)})`,
                           "data-activation": acts[i] },
      el("rect", { width: CELL_W, height: CELL_H, rx: 4, fill: rgb(colour), stroke: "#ccc" }),
      el("text", { x: CELL_W / 2, y: CELL_H / 2, "text-anchor": "middle", "dominant-baseline": "middle",
                   fill: inkOn(colour) }, i === 0 && t.token_id === bos ? "BOS" : showToken(t.token, 10)));
    cell.addEventListener("click", () => showTop(t, i));
    svg.append(cell);
    return cell;
  });
  svg.append(colourBar(8, TOP + rows * (CELL_H + GAP) + 6, 200, scale, "activation"));
  const line = (y, label, list) => el("text", { x: 8, y, class: "feat-tokens" },
    `${label}: ${(list ?? []).map((t) => `${showToken(t.token, 12)} ${fmt(t.value, { sign: true })}`).join("  ") || "—"}`);
  svg.append(
    el("text", { x: 8, y: cardY, "font-weight": 600 }, `Feature ${feature.index}: read through the unembedding`),
    line(cardY + 20, "promotes", feature.promotes),
    line(cardY + 40, "suppresses", feature.suppresses),
  );
  if (feature.promotes === null) {
    svg.append(el("text", { x: 8, y: cardY + 60, fill: "#555" }, "(an attention-head SAE: its decoder writes before W_O)"));
  }
  const topOf = (t) => t.features.map((f) => `#${f.index} ${fmt(f.activation)}`).join(", ") || "none active";
  readable(svg, cells, COLS, (i) => `${JSON.stringify(tokens[i].token)} (#${i}): feature ${feature.index} = `
    + `${fmt(acts[i])}; L0 ${tokens[i].l0}; top features: ${topOf(tokens[i])}`, readout);

  // The clicked token's top features, as buttons that choose one.
  function showTop(t, i) {
    $("#feat-top").replaceChildren(`#${i} ${JSON.stringify(t.token)}: `, ...t.features.map((f) => {
      const b = make("button", { type: "button", className: "feat-pick", textContent: `#${f.index} ${fmt(f.activation)}` });
      b.addEventListener("click", () => choose(f.index));
      return b;
    }));
  }
  return svg;
}
