// Attention view: one head's pattern as a heatmap (query rows, key columns) beside an overview
// of every head of the layer, all from one /attention answer without `head`.
import * as api from "./api.js";
import { $ } from "./dom.js";
import { colourBar, el, figure, heatmap, readable, sequential, showToken } from "./svg.js";

const LABELS = 96;  // room for token labels left of and above the heatmap
const MAX_CELL_TOKENS = 128;  // longer texts: the heatmap is one image, not up to n_ctx^2 rects
const THUMB = 84, GAP = 16;
const WEIGHTS = sequential(1);

// The view (see app.js's TABS): a layer's answer serves every head of it.
export const attentionView = (page) => ({
  controls: ["#attn-layer", "#attn-head"],
  key: () => $("#attn-layer").value,
  request: () => api.attention(page.text(), Number($("#attn-layer").value)),
  draw: (data, readout) => drawAttention(data, Number($("#attn-head").value), readout, (head) => {
    $("#attn-head").value = head;
    page.redraw();
    $(`#panel-attention [data-head="${head}"]`)?.focus();
  }),
  name: () => `attention-L${$("#attn-layer").value}-H${$("#attn-head").value}`,
});

export function drawAttention(data, head, readout, selectHead) {
  const { tokens, layer, n_heads: nHeads } = data;
  const matrix = data.attention_matrix[head];
  const n = tokens.length;
  const asCells = n <= MAX_CELL_TOKENS;
  const cell = asCells ? Math.max(4, Math.min(28, Math.floor(480 / n))) : 512 / n;
  const top = 40 + LABELS, side = n * cell;
  const cols = Math.min(nHeads, 4), rows = Math.ceil(nHeads / cols);
  const gridX = LABELS + side + 48;
  const W = gridX + cols * (THUMB + GAP);
  const H = Math.max(top + side + 56, 60 + rows * (THUMB + 26));

  const svg = figure(W, H, `Attention pattern of layer ${layer}, head ${head}`);
  svg.append(el("text", { x: 8, y: 20, "font-size": 14, "font-weight": 600 },
                `Layer ${layer}, head ${head}: rows attend (query) to columns (key)`));
  const labels = tokens.map((token) => showToken(token));
  const cells = heatmap(svg, matrix, { x: LABELS, y: top, w: cell, h: cell, scale: WEIGHTS, gap: 0, image: !asCells,
                                       rowLabels: labels, colLabels: labels, above: true, rotate: true });
  if (!asCells) readout.textContent = `Values on hover for texts up to ${MAX_CELL_TOKENS} tokens; the JSON download has them all.`;
  svg.append(el("rect", { x: LABELS, y: top, width: side, height: side, fill: "none", stroke: "#999" }),
             colourBar(LABELS, top + side + 16, 160, WEIGHTS, "attention weight"));

  svg.append(el("text", { x: gridX, y: 44, "font-weight": 600 },
                `All ${nHeads} heads of layer ${layer} (click one)`));
  data.attention_matrix.forEach((pattern, h) => {
    const gx = gridX + (h % cols) * (THUMB + GAP), gy = 56 + Math.floor(h / cols) * (THUMB + 26);
    const tile = el("g", { class: "head-tile", transform: `translate(${gx} ${gy})`, tabindex: 0,
                           role: "button", "aria-label": `Show head ${h}`, "data-head": h });
    heatmap(tile, pattern, { w: THUMB / n, h: THUMB / n, scale: WEIGHTS, image: true });
    tile.append(
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
