// Logit lens grid (nostalgebraist style): layers x positions from one /lens answer, each cell the
// layer's top-1 next-token guess, shaded by its probability, the distribution's entropy or its KL
// to the final layer; with a target, the target's probability and rank across layers at the
// selected position, its crossover layer marked.
import { options } from "./dom.js";
import { colourBar, el, figure, heatmap, percent, readable, sequential, showToken } from "./svg.js";

const LEFT = 52, TOP = 74, CW = 64, CH = 22, CHART_H = 150;
// A grid reads at most this many positions per request: a window around the selected one.
const GRID_POSITIONS = 96;

const SHADES = {
  probability: { option: "probability", label: "top-1 probability", value: (data, l, i) => data.top[l][i][0].probability },
  entropy: { option: "entropy", label: "entropy (nats)", value: (data, l, i) => data.entropy[l][i] },
  kl: { option: "KL to final", label: "KL(final ‖ layer) (nats)", value: (data, l, i) => data.kl_to_final[l][i] },
};

// Which lens drew an answer: "Logit lens", or "Jacobian lens NAME" (its `artifact`).
export const lensTitle = (data) => (data.lens === "jacobian" ? `Jacobian lens ${data.artifact.name}` : "Logit lens");

// A "Shade" selector (the lens and compare views have one).
export const fillShades = (select) => options(select, Object.entries(SHADES).map(([key, s]) => [key, s.option]),
                                              "probability");

// The positions a grid asks for among `n` tokens (undefined: every one), centred on `selected`.
export function gridWindow(n, selected) {
  if (n <= GRID_POSITIONS) return undefined;
  const start = Math.min(Math.max(selected - GRID_POSITIONS / 2, 0), n - GRID_POSITIONS);
  return Array.from({ length: GRID_POSITIONS }, (_, i) => start + i);
}

// The target's probability (left axis) and rank (right axis, log scale, 1 on top) by layer at
// position index `k` of the answer, with the crossover layer marked.
function targetChart(data, k, x0, y0) {
  const t = data.target, nLayers = t.rank.length;
  const width = Math.max(360, Math.min(640, nLayers * 40)), span = Math.max(nLayers - 1, 1);
  const probs = t.probability.map((row) => row[k]), ranks = t.rank.map((row) => row[k]);
  const maxLog = Math.max(Math.log10(Math.max(...ranks)), 1);
  const x = (l) => x0 + (l / span) * width;
  const yP = (p) => y0 + CHART_H * (1 - p);
  const yR = (r) => y0 + CHART_H * (Math.log10(r) / maxLog);
  const position = data.positions[k], crossover = t.crossover_layer[k];
  const g = el("g", { class: "target-chart" },
    el("text", { x: x0, y: y0 - 24, "font-weight": 600 },
       `Target ${JSON.stringify(t.token)} (id ${t.token_id}) after #${position} ` +
       `${showToken(data.tokens[position], 20)}: probability and rank by layer`),
    el("rect", { x: x0, y: y0, width, height: CHART_H, fill: "none", stroke: "#ccc" }),
    el("text", { x: x0 - 6, y: y0 + 4, "text-anchor": "end", "font-size": 10, fill: "#1f77b4" }, "1"),
    el("text", { x: x0 - 6, y: y0 + CHART_H, "text-anchor": "end", "font-size": 10, fill: "#1f77b4" }, "0"),
    el("text", { x: x0 - 6, y: y0 + CHART_H / 2, "text-anchor": "end", "font-size": 10, fill: "#1f77b4" }, "p"),
  );
  for (let e = 0; e <= Math.ceil(maxLog); e++) {
    if (e > maxLog) break;
    g.append(el("text", { x: x0 + width + 6, y: yR(10 ** e) + 4, "font-size": 10, fill: "#d95f02" },
                e === 0 ? "rank 1" : `${10 ** e}`));
  }
  for (let l = 0; l < nLayers; l++) {
    g.append(el("text", { x: x(l), y: y0 + CHART_H + 14, "text-anchor": "middle", "font-size": 10 }, `L${l}`));
  }
  const line = (ys, attrs) => el("polyline", { points: ys.map((v, l) => `${x(l)},${v}`).join(" "),
                                               fill: "none", "stroke-width": 2, ...attrs });
  g.append(line(probs.map(yP), { stroke: "#1f77b4" }),
           line(ranks.map(yR), { stroke: "#d95f02", "stroke-dasharray": "5 3" }));
  if (data.logit_target) {  // a Jacobian grid: the logit lens's probability beside it
    const logit = data.logit_target.probability.map((row) => row[k]);
    g.append(line(logit.map(yP), { stroke: "#7f7f7f", "stroke-dasharray": "2 2", class: "logit-prob-line" }));
    logit.forEach((p, l) => g.append(el("circle", { cx: x(l), cy: yP(p), r: 2.5, fill: "#7f7f7f", class: "logit-prob" },
                                        el("title", {}, `layer ${l}: logit lens p = ${p}`))));
    g.append(el("text", { x: x0 + width - 300, y: y0 - 8, "font-size": 10, fill: "#7f7f7f" }, "··· logit lens p"));
  }
  probs.forEach((p, l) => g.append(el("circle", { cx: x(l), cy: yP(p), r: 3.5, fill: "#1f77b4", class: "target-prob" },
                                      el("title", {}, `layer ${l}: p = ${p}`))));
  ranks.forEach((r, l) => g.append(el("circle", { cx: x(l), cy: yR(r), r: 3.5, fill: "#d95f02", class: "target-rank" },
                                      el("title", {}, `layer ${l}: rank ${r}`))));
  if (crossover === null) {
    g.append(el("text", { x: x0, y: y0 + CHART_H + 32, fill: "#555", class: "crossover" },
                "never top-1 through the last layer (no crossover)"));
  } else {
    g.append(el("line", { x1: x(crossover), x2: x(crossover), y1: y0, y2: y0 + CHART_H, stroke: "#333",
                          "stroke-dasharray": "3 3" }),
             el("text", { x: x0, y: y0 + CHART_H + 32, fill: "#333", class: "crossover" },
                `crossover: layer ${crossover} (top-1 from there to the last layer)`));
  }
  g.append(el("text", { x: x0 + width - 170, y: y0 - 8, "font-size": 10, fill: "#1f77b4" },
              data.logit_target ? "— Jacobian p" : "— probability"),
           el("text", { x: x0 + width - 90, y: y0 - 8, "font-size": 10, fill: "#d95f02" }, "- - rank (log)"));
  return g;
}

// `position`: the selected token index (the target chart's position); `select(position)` is
// called when a cell is clicked.
export function drawLensGrid(data, readout, { shade, position, select }) {
  const nLayers = data.top.length, nPos = data.positions.length;
  const how = SHADES[shade];
  const values = data.top.map((_, l) => data.positions.map((_, i) => how.value(data, l, i)));
  const max = shade === "probability" ? 1 : Math.max(...values.flat(), 1e-9);
  const gridW = nPos * CW, gridH = nLayers * CH;
  const k = Math.max(data.positions.indexOf(position), 0);
  const chartY = TOP + gridH + 110;  // below the colour bar and its note
  const W = Math.max(LEFT + gridW + 24, 760);
  const H = data.target ? chartY + CHART_H + 48 : TOP + gridH + 80;
  const svg = figure(W, H, `${lensTitle(data)} grid, ${nLayers} layers by ${nPos} positions`);
  svg.classList.add("wide");
  svg.append(
    el("text", { x: 8, y: 20, "font-size": 14, "font-weight": 600, class: "lens-title" },
       `${lensTitle(data)}: each layer's top next-token guess at each position (last layer on top)`),
    el("text", { x: 8, y: 38, fill: "#555" },
       `shade = ${how.label}; grey row = the token that actually comes next; click a column to select it`),
  );
  const scale = sequential(max);
  const layer = (r) => nLayers - 1 - r;  // rows: the last layer on top
  const cells = heatmap(svg, [...values].reverse(), {
    x: LEFT, y: TOP, w: CW, h: CH, scale, cls: "lens-grid-cell",
    rowLabels: values.map((_, r) => `L${layer(r)}`),
    text: (v, r, i) => showToken(data.top[layer(r)][i][0].token, 8),
    attrs: (r, i) => ({ "data-layer": layer(r), "data-position": data.positions[i] }),
  });
  cells.forEach((cell, j) => cell.addEventListener("click", () => select(data.positions[j % nPos])));
  data.positions.forEach((p, i) => {
    const x = LEFT + i * CW + CW / 2;
    const next = data.tokens[p + 1];
    svg.append(
      el("text", { x, y: TOP - 8, "text-anchor": "middle", "font-size": 10, fill: "#777", "font-style": "italic" },
         next === undefined ? "(end)" : showToken(next, 8)),
      el("text", { x, y: TOP + gridH + 14, "text-anchor": "middle", "font-size": 10 }, `#${p}`),
      el("text", { x, y: TOP + gridH + 28, "text-anchor": "middle", "font-size": 11 }, showToken(data.tokens[p], 8)));
  });
  svg.append(el("rect", { x: LEFT + k * CW - 1, y: TOP - 20, width: CW + 1, height: gridH + 52, fill: "none",
                          stroke: "#d62728", "stroke-width": 2, class: "selected-column" }),
             colourBar(LEFT + 20, TOP + gridH + 44, 200, scale, how.label));
  if (data.target) svg.append(targetChart(data, k, LEFT + 20, chartY));

  readable(svg, cells, nPos, (j) => {
    const l = layer(Math.floor(j / nPos)), i = j % nPos;
    const p = data.positions[i];
    const top = data.top[l][i].map((t) => `${JSON.stringify(t.token)} ${percent(t.probability)}`).join(", ");
    let text = `layer ${l}, after #${p} ${showToken(data.tokens[p], 24)}: ${top}; ` +
               `entropy ${data.entropy[l][i].toFixed(3)} nats, KL to final ${data.kl_to_final[l][i].toFixed(3)} nats` +
               ` (top id ${data.top[l][i][0].token_id})`;
    if (data.target) {
      text += `; target ${JSON.stringify(data.target.token)}: p = ${data.target.probability[l][i]}, ` +
              `rank ${data.target.rank[l][i]}`;
    }
    return text;
  }, readout);
  return svg;
}
