// Attribution view: direct logit attribution from one /dla answer. Bars: what the embedding,
// each layer's attention and MLP output, and the biases add to the metric; heatmap: each head's
// share (layers x heads). Diverging colours: blue raises the metric, red lowers it.
import * as api from "./api.js";
import { tokenSpec } from "./api.js";
import { $ } from "./dom.js";
import { colourBar, diverging, el, figure, fmt, heatmap, readable, rgb, showToken } from "./svg.js";

const LABEL = 84, BAR_W = 280, ROW = 18, TOP = 78, GAP = 56, CELL_W = 34;
const BARS = diverging(1);  // a bar's colour is its sign; its length, its value

// Fixed places, so that the bars' values line up when compared.
const signed = (v) => fmt(v, { decimals: 4, sign: true });

// The view (see app.js's TABS). No answer typed: the model's own top-1 next token at that position.
export const attributionView = (page) => ({
  controls: ["#dla-pos", "#dla-answer", "#dla-distractor"],
  key: () => `${$("#dla-pos").value}/${$("#dla-answer").value}/${$("#dla-distractor").value}`,
  request: async () => {
    const position = Number($("#dla-pos").value);
    const answer = tokenSpec($("#dla-answer").value)
      ?? (await api.predict(page.text(), position, 1)).predictions_by_layer.at(-1).top_tokens[0].token_id;
    return api.dla(page.text(), answer, tokenSpec($("#dla-distractor").value), position);
  },
  draw: drawAttribution,
  name: () => `dla-pos${$("#dla-pos").value}`,
});

function drawAttribution(data, readout) {
  const nLayers = data.attn.length, nHeads = data.heads[0].length;
  const rows = [["embed", data.embed]];
  for (let l = 0; l < nLayers; l++) rows.push([`L${l} attn`, data.attn[l]], [`L${l} mlp`, data.mlp[l]]);
  rows.push(["bias", data.bias], ["total", data.total]);
  const barMax = Math.max(...rows.map(([, v]) => Math.abs(v)), 1e-9);
  const headMax = Math.max(...data.heads.flat().map(Math.abs), 1e-9);
  const heatX = LABEL + BAR_W + GAP + 30;
  const W = Math.max(heatX + nHeads * CELL_W + 40, 720);
  const H = TOP + Math.max(rows.length * ROW, nLayers * ROW + 40) + 40;
  const target = data.distractor
    ? `logit(${JSON.stringify(data.answer.token)}) − logit(${JSON.stringify(data.distractor.token)})`
    : `logit(${JSON.stringify(data.answer.token)})`;
  const svg = figure(W, H, `Direct logit attribution of ${target}`);
  svg.append(
    el("text", { x: 8, y: 20, "font-size": 14, "font-weight": 600 },
       `Direct logit attribution after #${data.position} ${showToken(data.token_str, 20)}: ` +
       `${target} = ${fmt(data.total, { decimals: 4 })}`),
    el("text", { x: 8, y: 38, fill: "#555" },
       "Each part of the residual stream read through the final norm (scale frozen): blue raises, red lowers."),
    el("text", { x: LABEL, y: TOP - 20, "font-weight": 600 }, "By component"),
    el("text", { x: heatX, y: TOP - 20, "font-weight": 600 }, "By head (attention output bias aside)"),
  );
  const zero = LABEL + BAR_W / 2;
  svg.append(el("line", { x1: zero, x2: zero, y1: TOP - 4, y2: TOP + rows.length * ROW, stroke: "#999" }));
  const items = [], describe = [];
  rows.forEach(([label, value], r) => {
    const y = TOP + r * ROW;
    const len = (Math.abs(value) / barMax) * (BAR_W / 2);
    const bar = el("rect", { x: value >= 0 ? zero : zero - len, y: y + 2, width: Math.max(len, 1), height: ROW - 4,
                             fill: rgb(BARS.colour(value >= 0 ? 0.75 : -0.75)), class: "dla-bar",
                             "data-label": label });
    svg.append(el("text", { x: LABEL - 6, y: y + ROW / 2, "text-anchor": "end", "dominant-baseline": "middle",
                            "font-weight": label === "total" ? 700 : 400 }, label), bar);
    items.push(bar);
    describe.push(`${label}: ${signed(value)}`);
  });
  const scale = diverging(headMax);
  items.push(...heatmap(svg, data.heads, {
    x: heatX, y: TOP, w: CELL_W, h: ROW, scale, cls: "dla-head", above: true,
    rowLabels: data.heads.map((_, l) => `L${l}`), colLabels: data.heads[0].map((_, h) => `H${h}`),
    text: nHeads <= 16 ? (v) => fmt(v, { decimals: 2 }) : undefined,
    attrs: (l, h) => ({ "data-layer": l, "data-head": h }),
  }));
  data.heads.forEach((row, l) => row.forEach((value, h) => describe.push(`layer ${l}, head ${h}: ${signed(value)}`)));
  svg.append(colourBar(heatX + 24, TOP + nLayers * ROW + 16, 160, scale));
  readable(svg, items, 1, (i) => describe[i], readout);
  return svg;
}
