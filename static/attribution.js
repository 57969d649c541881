// Attribution view: direct logit attribution from one /dla answer. Bars: what the embedding,
// each layer's attention and MLP output, and the biases add to the metric; heatmap: each head's
// share (layers x heads). Diverging colours: blue raises the metric, red lowers it.
import { colourBar, diverging, el, figure, inkOn, readable, rgb, showToken } from "./svg.js";

const LABEL = 84, BAR_W = 280, ROW = 18, TOP = 78, GAP = 56, CELL_W = 34;

const fmt = (v) => (v >= 0 ? "+" : "") + v.toFixed(4);

export function drawAttribution(data, readout) {
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
       `${target} = ${data.total.toFixed(4)}`),
    el("text", { x: 8, y: 38, fill: "#555" },
       "Each part of the residual stream read through the final norm (scale frozen): blue raises, red lowers."),
    el("text", { x: LABEL, y: TOP - 12, "font-weight": 600 }, "By component"),
    el("text", { x: heatX, y: TOP - 12, "font-weight": 600 }, "By head (attention output bias aside)"),
  );
  const zero = LABEL + BAR_W / 2;
  svg.append(el("line", { x1: zero, x2: zero, y1: TOP - 4, y2: TOP + rows.length * ROW, stroke: "#999" }));
  const items = [], describe = [];
  rows.forEach(([label, value], r) => {
    const y = TOP + r * ROW;
    const len = (Math.abs(value) / barMax) * (BAR_W / 2);
    const bar = el("rect", { x: value >= 0 ? zero : zero - len, y: y + 2, width: Math.max(len, 1), height: ROW - 4,
                             fill: rgb(diverging(value >= 0 ? 0.75 : -0.75)), class: "dla-bar",
                             "data-label": label });
    svg.append(el("text", { x: LABEL - 6, y: y + ROW / 2, "text-anchor": "end", "dominant-baseline": "middle",
                            "font-weight": label === "total" ? 700 : 400 }, label), bar);
    items.push(bar);
    describe.push(`${label}: ${fmt(value)}`);
  });
  for (let l = 0; l < nLayers; l++) {
    svg.append(el("text", { x: heatX - 6, y: TOP + l * ROW + ROW / 2, "text-anchor": "end",
                            "dominant-baseline": "middle", "font-size": 11 }, `L${l}`));
    data.heads[l].forEach((value, h) => {
      const fill = diverging(value / headMax);
      const cell = el("g", { class: "dla-head", transform: `translate(${heatX + h * CELL_W} ${TOP + l * ROW})`,
                             "data-layer": l, "data-head": h },
        el("rect", { width: CELL_W - 1, height: ROW - 1, fill: rgb(fill) }));
      if (nHeads <= 16) {
        cell.append(el("text", { x: CELL_W / 2, y: ROW / 2, "text-anchor": "middle", "dominant-baseline": "middle",
                                 "font-size": 9, fill: inkOn(fill) }, value.toFixed(2)));
      }
      svg.append(cell);
      items.push(cell);
      describe.push(`layer ${l}, head ${h}: ${fmt(value)}`);
    });
  }
  for (let h = 0; h < nHeads; h++) {
    svg.append(el("text", { x: heatX + h * CELL_W + CELL_W / 2, y: TOP - 2, "text-anchor": "middle", "font-size": 10 },
                  `H${h}`));
  }
  svg.append(colourBar(heatX + 24, TOP + nLayers * ROW + 16, 160, (t) => diverging(2 * t - 1),
                       (-headMax).toFixed(3), `+${headMax.toFixed(3)}`));
  readable(svg, items, 1, (i) => describe[i], readout);
  return svg;
}
