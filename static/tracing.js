// Causal tracing view (ROME, Meng et al. 2022): three POST /causal_trace jobs on one prompt
// (kind resid, mlp, attn), drawn as ROME's three panels side by side: tokens down, layers across,
// each cell the answer's probability after restoring that clean state into the noised run; the
// subject tokens (the ones noised) are starred.
import * as api from "./api.js";
import { $ } from "./dom.js";
import { jobView } from "./jobs.js";
import { colourBar, el, figure, fmt, heatmap, readable, sequential, showToken } from "./svg.js";

const KINDS = {  // ROME's colours: each kind's sequential scale runs from white to its own hue
  resid: { label: "residual stream", color: [84, 39, 143] },
  mlp: { label: "MLP", color: [0, 109, 44] },
  attn: { label: "attention", color: [165, 15, 21] },
};
const LABELS = 120, TOP = 84, GAP = 40, ROW = 20, PANEL_MIN = 220;

function inputs() {
  return {
    text: $("#trace-text").value, subject: $("#trace-subject").value,
    answer: api.tokenSpec($("#trace-answer").value), samples: Number($("#trace-samples").value),
  };
}

// The view (see app.js's TABS); its data is the list of the three answers.
export const tracingView = (page) => jobView({
  prefix: "trace", redraw: page.redraw,
  hint: "Press Run to trace the three kinds (jobs: the bar shows their progress).",
  read: inputs,
  starts: (i) => Object.keys(KINDS).map((kind) => () => api.startCausalTrace(i.text, i.subject, i.answer, kind,
                                                                              i.samples)),
  finish: (data, status) => {
    status.textContent = ["done", ...new Set(data.filter((d) => d.warning).map((d) => d.warning))].join("; ");
    return data;
  },
  draw: drawTracing,
  name: () => "causal-trace",
});

// The layers a cell of kind mlp/attn restores together (ROME's window, as the server does it).
function windowOf(layer, window, nLayers) {
  return [Math.max(0, layer - Math.floor(window / 2)), Math.min(nLayers, layer + Math.ceil(window / 2)) - 1];
}

function drawTracing(data, readout) {
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
    // from the noised run's probability (or below) to the best restoration
    const scale = sequential(Math.max(...values.flat()), { lo: Math.min(d.corrupt_prob, ...values.flat()),
                                                           stops: [[255, 255, 255], kind.color] });
    svg.append(el("text", { x, y: TOP - 14, "font-weight": 600, class: "trace-title" },
                  `restore ${kind.label}${d.window === null ? "" : ` (window ${d.window})`}`));
    const cells = heatmap(svg, values, {
      x, y: TOP, w, h: ROW, scale, cls: `trace-cell trace-${d.kind}`,
      rowLabels: k === 0 ? tokens.map((tok, p) => `${subject.has(p) ? "*" : ""}${showToken(tok, 14)}`) : [],
      colLabels: [...Array(nLayers).keys()].map(String),
    });
    svg.append(el("text", { x: x + panelW / 2, y: TOP + seq * ROW + 26, "text-anchor": "middle", "font-size": 11 }, "layer"),
               colourBar(x + 60, TOP + seq * ROW + 38, panelW - 120, scale));
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
