// Trajectories view: each traced token's residual stream, layer by layer, in the shared 2D PCA
// plane of the /trace answer.
import * as api from "./api.js";
import { PALETTE, el, figure, percent, readable, showToken } from "./svg.js";

const W = 940, H = 520;
const M = { left: 56, right: 170, top: 50, bottom: 48 };
const ROW = 18;
// Legend rows that fit beside the plot; past that the last row counts the rest (every path
// still has its end label and hover text), so a 1000-token trace keeps a readable plot.
const LEGEND_ROWS = Math.floor((H - M.top - M.bottom) / ROW);

function scale([lo, hi], [a, b]) {
  const span = hi - lo || 1;
  return (v) => a + ((v - lo) / span) * (b - a);
}

function extent(values) {
  const lo = Math.min(...values), hi = Math.max(...values);
  const pad = (hi - lo || 1) * 0.06;
  return [lo - pad, hi + pad];
}

// The view (see app.js's TABS): the tokens whose chips are pressed.
export const trajectoriesView = (page) => ({
  key: () => [...page.traced()].join(","),
  request: () => api.trace(page.text(), [...page.traced()].sort((a, b) => a - b)),
  draw: drawTrajectories,
  name: () => "trajectories",
});

function drawTrajectories(data, readout) {
  const [ev1, ev2] = data.pca_explained_variance;
  const paths = data.tokens.map((t) => data.trajectories[String(t.index)]);
  const all = paths.flat();
  const nLayers = paths[0].length;
  const x = scale(extent(all.map((p) => p.x)), [M.left, W - M.right]);
  const y = scale(extent(all.map((p) => p.y)), [H - M.bottom, M.top]);

  const svg = figure(W, H, "Residual stream trajectories across layers (PCA)");
  svg.append(
    el("text", { x: M.left, y: 22, "font-size": 14, "font-weight": 600 },
       `Residual stream by layer, 2D PCA (explains ${percent(ev1 + ev2)} of variance)`),
    el("text", { x: M.left, y: 38, fill: "#555", "font-size": 11 },
       `Each path runs from layer 0 (faint) to layer ${nLayers - 1} (solid); hover a path for its layers.`),
    el("rect", { x: M.left, y: M.top, width: W - M.left - M.right, height: H - M.top - M.bottom,
                 fill: "none", stroke: "#ccc" }),
    el("text", { x: (M.left + W - M.right) / 2, y: H - 14, "text-anchor": "middle", fill: "#444" },
       `PC1 (${percent(ev1)} of variance)`),
    el("text", { transform: `translate(18 ${(M.top + H - M.bottom) / 2}) rotate(-90)`,
                 "text-anchor": "middle", fill: "#444" }, `PC2 (${percent(ev2)} of variance)`),
  );

  const points = [];
  const describe = [];
  paths.forEach((path, k) => {
    const token = data.tokens[k];
    const color = PALETTE[k % PALETTE.length];
    const group = el("g", { class: "trajectory", "data-index": token.index });
    group.append(el("polyline", { points: path.map((p) => `${x(p.x)},${y(p.y)}`).join(" "),
                                  fill: "none", stroke: color, "stroke-width": 1.5, "stroke-opacity": 0.7 }));
    for (const p of path) {
      // Later layers are more opaque, so a path's direction reads at a glance.
      const point = el("circle", { cx: x(p.x), cy: y(p.y), r: 4, fill: color, class: "point",
                                   "fill-opacity": 0.35 + 0.65 * (p.layer / Math.max(nLayers - 1, 1)) });
      group.append(point);
      points.push(point);
      describe.push(`${showToken(token.token_str, 30)} (#${token.index}), layer ${p.layer}: ` +
                    `PC1 ${p.x.toFixed(2)}, PC2 ${p.y.toFixed(2)}`);
    }
    // Every point's layer, shown (page CSS) while its path is hovered or has the keyboard cursor;
    // exports keep only the end labels, which do not pile up at the shared start.
    for (const p of path.slice(0, -1)) {
      group.append(el("text", { x: x(p.x) + 5, y: y(p.y) - 5, "font-size": 10, fill: color,
                                visibility: "hidden", class: "layer-label" }, `L${p.layer}`));
    }
    const last = path[path.length - 1];
    group.append(el("text", { x: x(last.x) + 6, y: y(last.y) - 6, "font-size": 10, fill: color,
                              "font-weight": 600 }, `L${last.layer} ${showToken(token.token_str, 10)}`));
    svg.append(group);
    const listed = data.tokens.length <= LEGEND_ROWS || k < LEGEND_ROWS - 1;
    if (listed) {
      svg.append(el("circle", { cx: W - M.right + 20, cy: M.top + 8 + k * ROW, r: 5, fill: color, class: "legend" }),
                 el("text", { x: W - M.right + 30, y: M.top + 12 + k * ROW },
                    `#${token.index} ${showToken(token.token_str, 16)}`));
    }
  });
  if (data.tokens.length > LEGEND_ROWS) {
    svg.append(el("text", { x: W - M.right + 14, y: M.top + 12 + (LEGEND_ROWS - 1) * ROW, fill: "#555" },
                  `… and ${data.tokens.length - LEGEND_ROWS + 1} more tokens`));
  }
  readable(svg, points, nLayers, (i) => describe[i], readout);
  return svg;
}
