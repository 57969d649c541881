// Compare view: the same text in two models side by side, each column its logit-lens grid above
// one head's attention pattern, from /lens and /attention answers that name their model.
import { drawAttention } from "./attention.js";
import { drawLensGrid } from "./lensgrid.js";
import { el, figure } from "./svg.js";

const GAP = 32, TITLE = 30;

// data: [{model, lens, attention}] (two). Each part keeps its own hover readout; a head tile
// calls selectHead(head).
export function drawCompare(data, readout, { head, shade, selectHead }) {
  const columns = data.map(({ model, lens, attention }) => {
    const parts = [
      drawLensGrid(lens, readout, { shade, position: lens.positions.at(-1), select: () => {} }),
      drawAttention(attention, head, readout, selectHead),
    ];
    const size = (svg) => [svg.width.baseVal.value, svg.height.baseVal.value];
    return { model, parts, width: Math.max(...parts.map((p) => size(p)[0])),
             heights: parts.map((p) => size(p)[1]) };
  });
  const width = columns.reduce((sum, c) => sum + c.width, 0) + GAP * (columns.length - 1);
  const height = TITLE + Math.max(...columns.map((c) => c.heights.reduce((a, b) => a + b, 0)));
  const svg = figure(width, height, `Comparison of ${data.map((d) => d.model).join(" and ")}`);
  let x = 0;  // not "wide": the pair scales down to the page's width instead of scrolling
  for (const column of columns) {
    svg.append(el("text", { x: x + 8, y: 20, "font-size": 15, "font-weight": 700, class: "compare-model" },
                  column.model));
    let y = TITLE;
    column.parts.forEach((part, i) => {
      part.classList.remove("figure", "wide");  // nested: placed by x/y, not scaled by page CSS
      part.setAttribute("x", x);
      part.setAttribute("y", y);
      y += column.heights[i];
      svg.append(part);
    });
    x += column.width + GAP;
  }
  return svg;
}
