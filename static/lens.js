// Logit lens view: for one position, each layer's top-k next-token guesses (the residual stream
// read through the final layer norm and unembedding), as a layers x top-k table of bars.
// The grid mode: see lensgrid.js.
import * as api from "./api.js";
import { tokenSpec } from "./api.js";
import { $ } from "./dom.js";
import { drawLensGrid, fillShades, gridWindow } from "./lensgrid.js";
import { el, figure, percent, readable, showToken } from "./svg.js";

const ROW_LABEL = 64, CELL_W = 150, ROW_H = 28, TOP = 58;

const grid = () => $("#lens-mode").value === "grid";

// The view (see app.js's TABS), in either mode. The grid refetches only for another window or
// target: shade and position just redraw.
export function lensView(page) {
  const position = () => Number($("#lens-pos").value);
  const positions = () => gridWindow(page.tokens().length, position());
  fillShades($("#lens-shade"));
  $("#lens-mode").addEventListener("change", () => {
    document.querySelectorAll("#panel-lens .grid-only").forEach((n) => { n.hidden = !grid(); });
    document.querySelectorAll("#panel-lens .position-only").forEach((n) => { n.hidden = grid(); });
    page.redraw();
  });
  return {
    controls: ["#lens-pos", "#lens-k", "#lens-shade", "#lens-target"],
    key: () => (grid() ? `grid/${positions()}/${$("#lens-target").value}` : `${position()}/${$("#lens-k").value}`),
    request: () => (grid()
      ? api.lens(page.text(), { positions: positions(), target: tokenSpec($("#lens-target").value), top_k: 5 })
      : api.predict(page.text(), position(), Number($("#lens-k").value))),
    draw: (data, readout) => (grid()
      ? drawLensGrid(data, readout, {
        shade: $("#lens-shade").value,
        position: position(),
        select: (p) => {
          $("#lens-pos").value = String(p);
          page.redraw();
        },
      })
      : drawLens(data, readout)),
    name: () => (grid() ? "lens-grid" : `lens-pos${position()}`),
  };
}

function drawLens(data, readout) {
  const rows = data.predictions_by_layer;
  const k = rows[0].top_tokens.length;
  const W = ROW_LABEL + k * CELL_W + 8, H = TOP + rows.length * ROW_H + 10;
  const svg = figure(W, H, `Logit lens at position ${data.token_index}`);
  svg.append(
    el("text", { x: 8, y: 20, "font-size": 14, "font-weight": 600 },
       `Logit lens after #${data.token_index} ${showToken(data.token_str, 30)}: next-token top ${k} by layer`),
    el("text", { x: 8, y: 40, fill: "#555" }, "bar length = probability"),
  );
  for (let r = 0; r < k; r++) {
    svg.append(el("text", { x: ROW_LABEL + r * CELL_W + 4, y: TOP - 4, fill: "#555", "font-size": 11 },
                  `#${r + 1}`));
  }

  const cells = [];
  rows.forEach((row, i) => {
    const y = TOP + i * ROW_H;
    const group = el("g", { class: "lens-row", transform: `translate(0 ${y})` },
      el("text", { x: 8, y: ROW_H / 2, "dominant-baseline": "middle", "font-weight": 600 }, `L${row.layer}`));
    row.top_tokens.forEach((p, r) => {
      const x = ROW_LABEL + r * CELL_W, width = CELL_W - 6;
      const cell = el("g", { class: "lens-cell", transform: `translate(${x} 2)` },
        el("rect", { width, height: ROW_H - 4, fill: "#f1f3f5", rx: 3 }),
        el("rect", { width: Math.max(p.probability * width, 1), height: ROW_H - 4,
                     fill: "#9ecae1", rx: 3, class: "bar" }),
        el("text", { x: 4, y: (ROW_H - 4) / 2, "dominant-baseline": "middle" }, showToken(p.token, 12)),
        el("text", { x: width - 4, y: (ROW_H - 4) / 2, "dominant-baseline": "middle",
                     "text-anchor": "end", fill: "#333", "font-size": 11 },
           percent(p.probability)));
      group.append(cell);
      cells.push(cell);
    });
    svg.append(group);
  });

  readable(svg, cells, k, (i) => {
    const row = rows[Math.floor(i / k)], p = row.top_tokens[i % k];
    return `layer ${row.layer}, #${(i % k) + 1}: ${JSON.stringify(p.token)} (id ${p.token_id}), ` +
           `p = ${p.probability.toFixed(4)}, logit ${p.logit.toFixed(2)}`;
  }, readout);
  return svg;
}
