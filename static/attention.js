// Attention view: one head's pattern as a heatmap (query rows, key columns) beside an overview
// of every head of the layer, all from one /attention answer without `head`.
import { blues, el, figure, readable, rgb, showToken } from "./svg.js";

const LABELS = 96;  // room for token labels left of and above the heatmap
const MAX_CELL_TOKENS = 128;  // longer texts: the heatmap is one image, not up to n_ctx^2 rects
const THUMB = 84, GAP = 16;

// A pattern as one T x T pixel <image>, `size` wide: overview tiles and long texts' heatmaps.
function pixelImage(matrix, size) {
  const n = matrix.length;
  const canvas = Object.assign(document.createElement("canvas"), { width: n, height: n });
  const ctx = canvas.getContext("2d");
  const pixels = ctx.createImageData(n, n);
  matrix.forEach((row, q) => row.forEach((value, k) => {
    pixels.data.set([...blues(value), 255], (q * n + k) * 4);
  }));
  ctx.putImageData(pixels, 0, 0);
  return el("image", { href: canvas.toDataURL("image/png"), width: size, height: size,
                       style: "image-rendering: pixelated", preserveAspectRatio: "none" });
}

export function drawAttention(data, head, readout, selectHead) {
  const { tokens, layer, n_heads: nHeads } = data;
  const matrix = data.attention_matrix[head];
  const n = tokens.length;
  const asCells = n <= MAX_CELL_TOKENS;
  const cell = asCells ? Math.max(4, Math.min(28, Math.floor(480 / n))) : 512 / n;
  const labelStep = Math.ceil(9 / cell);  // skip labels that would overlap
  const fontSize = Math.min(11, cell - 1 + (labelStep - 1) * cell);
  const top = 40 + LABELS, side = n * cell;
  const cols = Math.min(nHeads, 4), rows = Math.ceil(nHeads / cols);
  const gridX = LABELS + side + 48;
  const W = gridX + cols * (THUMB + GAP);
  const H = Math.max(top + side + 56, 60 + rows * (THUMB + 26));

  const svg = figure(W, H, `Attention pattern of layer ${layer}, head ${head}`);
  svg.append(el("text", { x: 8, y: 20, "font-size": 14, "font-weight": 600 },
                `Layer ${layer}, head ${head}: rows attend (query) to columns (key)`));

  const cells = [];
  const heat = el("g", { transform: `translate(${LABELS} ${top})` });
  if (asCells) {
    matrix.forEach((row, q) => row.forEach((value, k) => {
      const rect = el("rect", { x: k * cell, y: q * cell, width: cell, height: cell,
                                fill: rgb(blues(value)), class: "cell" });
      heat.append(rect);
      cells.push(rect);
    }));
  } else {
    heat.append(pixelImage(matrix, side));
    readout.textContent = `Values on hover for texts up to ${MAX_CELL_TOKENS} tokens; the JSON download has them all.`;
  }
  heat.append(el("rect", { width: side, height: side, fill: "none", stroke: "#999" }));
  tokens.forEach((token, i) => {
    if (i % labelStep) return;
    const mid = i * cell + cell / 2;
    heat.append(
      el("text", { x: -4, y: mid, "text-anchor": "end", "dominant-baseline": "middle",
                   "font-size": fontSize }, showToken(token)),
      el("text", { transform: `translate(${mid} -4) rotate(-60)`, "dominant-baseline": "middle",
                   "font-size": fontSize }, showToken(token)),
    );
  });
  svg.append(heat);

  // Colour scale, 0 .. 1.
  const bar = el("g", { transform: `translate(${LABELS} ${top + side + 16})` });
  const steps = 20;
  for (let i = 0; i < steps; i++) {
    bar.append(el("rect", { x: i * 8, width: 8, height: 10, fill: rgb(blues(i / (steps - 1))) }));
  }
  bar.append(el("text", { x: -4, y: 9, "text-anchor": "end", "font-size": 10 }, "0"),
             el("text", { x: steps * 8 + 4, y: 9, "font-size": 10 }, "1 attention weight"));
  svg.append(bar);

  svg.append(el("text", { x: gridX, y: 44, "font-weight": 600 },
                `All ${nHeads} heads of layer ${layer} (click one)`));
  data.attention_matrix.forEach((pattern, h) => {
    const gx = gridX + (h % cols) * (THUMB + GAP), gy = 56 + Math.floor(h / cols) * (THUMB + 26);
    const tile = el("g", { class: "head-tile", transform: `translate(${gx} ${gy})`, tabindex: 0,
                           role: "button", "aria-label": `Show head ${h}`, "data-head": h },
      pixelImage(pattern, THUMB),
      el("rect", { width: THUMB, height: THUMB, fill: "none",
                   stroke: h === head ? "#d62728" : "#999", "stroke-width": h === head ? 3 : 1 }),
      el("text", { x: THUMB / 2, y: THUMB + 14, "text-anchor": "middle",
                   "font-weight": h === head ? 700 : 400 }, `head ${h}`));
    tile.addEventListener("click", () => selectHead(h));
    tile.addEventListener("keydown", (event) => {
      if (event.key === "Enter" || event.key === " ") {
        event.preventDefault();
        selectHead(h);
      }
    });
    svg.append(tile);
  });

  readable(svg, cells, n, (i) => {
    const q = Math.floor(i / n), k = i % n;
    // the API's value as sent (4 significant digits): small weights stay readable, never 0.0000
    return `query #${q} ${showToken(tokens[q], 30)} → key #${k} ${showToken(tokens[k], 30)}: ` +
           String(matrix[q][k]);
  }, readout);
  return svg;
}
