// Causal tracing view (ROME, Meng et al. 2022): three POST /causal_trace jobs on one prompt
// (kind resid, mlp, attn), drawn as ROME's three panels side by side: tokens down, layers across,
// each cell the answer's probability after restoring that clean state into the noised run; the
// subject tokens (the ones noised) are starred.
import * as api from "./api.js";
import { jobView } from "./jobs.js";
import { colourBar, el, figure, fmt as fmt4, heatmap, readable, rgb, showToken } from "./svg.js";

const $ = (selector) => document.querySelector(selector);
const KINDS = {  // ROME's colours
  resid: { label: "residual stream", color: [84, 39, 143] },
  mlp: { label: "MLP", color: [0, 109, 44] },
  attn: { label: "attention", color: [165, 15, 21] },
};
const LABELS = 120, TOP = 84, GAP = 40, ROW = 20, PANEL_MIN = 220;

const shade = (color, t) => color.map((c) => Math.round(255 + (c - 255) * Math.min(Math.max(t, 0), 1)));

const fmt = (v) => fmt4(v, 3);

function inputs() {
  return {
    text: $("#trace-text").value, subject: $("#trace-subject").value,
    answer: api.tokenSpec($("#trace-answer").value), samples: Number($("#trace-samples").value),
  };
}

// The view (see app.js's `views`); its data is the list of the three answers.
export const tracingView = () => jobView({
  button: $("#trace-run"), bar: $("#trace-progress"), status: $("#trace-status"), cancel: $("#trace-cancel"),
  hint: "Press Run to trace the three kinds (jobs: the bar shows their progress).",
  read: inputs,
  starts: (i) => Object.keys(KINDS).map((kind) => () => api.startCausalTrace(i.text, i.subject, i.answer, kind,
                                                                              i.samples)),
  finish: (data) => {
    $("#trace-status").textContent = ["done", ...new Set(data.filter((d) => d.warning).map((d) => d.warning))].join("; ");
    return data;
  },
  draw: drawTracing,
  name: () => "causal-trace",
});

// The layers a cell of kind mlp/attn restores together (ROME's window, as the server does it).
function windowOf(layer, window, nLayers) {
  return [Math.max(0, layer - Math.floor(window / 2)), Math.min(nLayers, layer + Math.ceil(window / 2)) - 1];
}

export function drawTracing(data, readout) {
  const first = data[0], tokens = first.tokens, nLayers = first.scores.length, seq = tokens.length;
  const subject = new Set(first.subject_positions);
  const w = Math.max(12, Math.floor(Math.max(PANEL_MIN, 12 * nLayers) / nLayers));
  const panelW = nLayers * w;
  const W = Math.max(LABELS + data.length * (panelW + GAP), 920), H = TOP + seq * ROW + 70;
  const answer = JSON.stringify(first.answer.token);
  const svg = figure(W, H, `Causal tracing of P(${answer})`);
  svg.append(
    el("text", { x: 8, y: 20, "font-size": 14, "font-weight": 600 },
       `Causal tracing: P(${answer}) after restoring one clean state into the run with the subject noised`),
    el("text", { x: 8, y: 38, fill: "#555", "font-size": 11 },
       `clean ${fmt(first.clean_prob)}, noised ${fmt(first.corrupt_prob)} (noise σ ${fmt(first.noise)}, ` +
       `${first.samples} samples, seed ${first.seed}); starred tokens: the subject, whose embeddings are noised`));
  const items = [], describe = [];
  data.forEach((d, k) => {
    const x = LABELS + k * (panelW + GAP), kind = KINDS[d.kind];
    const values = tokens.map((_, p) => d.scores.map((row) => row[p]));  // [position][layer]
    const lo = Math.min(d.corrupt_prob, ...values.flat()), hi = Math.max(...values.flat());
    const t = (v) => (v - lo) / (hi - lo || 1);
    svg.append(el("text", { x, y: TOP - 14, "font-weight": 600, class: "trace-title" },
                  `restore ${kind.label}${d.window === null ? "" : ` (window ${d.window})`}`));
    const cells = heatmap(svg, values, {
      x, y: TOP, w, h: ROW, cls: `trace-cell trace-${d.kind}`, fill: (v) => rgb(shade(kind.color, t(v))),
      rowLabels: k === 0 ? tokens.map((tok, p) => `${subject.has(p) ? "*" : ""}${showToken(tok, 14)}`) : [],
      colLabels: [...Array(nLayers).keys()].map(String),
    });
    svg.append(el("text", { x: x + panelW / 2, y: TOP + seq * ROW + 26, "text-anchor": "middle", "font-size": 11 }, "layer"),
               colourBar(x + 60, TOP + seq * ROW + 38, panelW - 120, (s) => shade(kind.color, s), fmt(lo), fmt(hi)));
    cells.forEach((cell, i) => {
      const p = Math.floor(i / nLayers), l = i % nLayers;
      if (subject.has(p)) cell.setAttribute("data-subject", "");
      const restored = d.window === null ? `layer ${l}` : `layer ${l} (layers ${windowOf(l, d.window, nLayers).join("–")})`;
      const rec = d.recovery ? `, recovery ${fmt(d.recovery[l][p])}` : "";
      describe.push(`${d.kind} · ${restored} · #${p} ${showToken(tokens[p], 24)}${subject.has(p) ? " (subject)" : ""}: ` +
                    `P(${answer}) = ${fmt(values[p][l])} (clean ${fmt(d.clean_prob)}, noised ${fmt(d.corrupt_prob)}${rec})`);
    });
    items.push(...cells);
  });
  // Bold subject labels on the first panel.
  svg.querySelectorAll("g > text").forEach((label) => {
    if (label.textContent.startsWith("*")) label.setAttribute("font-weight", 700);
  });
  readable(svg, items, nLayers, (i) => describe[i], readout);
  return svg;
}
