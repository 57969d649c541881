// Compare view: the same text in two models side by side, each column its lens grid (the logit
// lens, or each model's first Jacobian lens) above one head's attention pattern, from /lens and
// /attention answers that name their model.
import * as api from "./api.js";
import { drawAttention } from "./attention.js";
import { $, options, range } from "./dom.js";
import { drawLensGrid, fillShades, gridWindow } from "./lensgrid.js";
import { el, figure } from "./svg.js";

const GAP = 32, TITLE = 30;

// The layers and heads both compared models have.
function choices(models) {
  const pair = [$("#cmp-a").value, $("#cmp-b").value].map((n) => models.find((m) => m.name === n));
  const keep = (select, n, label) => options(select, range(n, label), String(Math.min(Number(select.value) || 0, n - 1)));
  keep($("#cmp-layer"), Math.min(...pair.map((m) => m.n_layers)), "L");
  keep($("#cmp-head"), Math.min(...pair.map((m) => m.n_heads)), "H");
}

// The models to choose from (GET /models, several): the first two are compared at first.
export function compareModels(models) {
  const names = models.map((m) => [m.name, m.name]);
  options($("#cmp-a"), names, names[0][0]);
  options($("#cmp-b"), names, names[1][0]);
  choices(models);
}

// The view (see app.js's TABS): both models' lens grids over the lens view's window of
// positions, and one layer's attention of each.
export function compareView(page) {
  const pair = () => [$("#cmp-a").value, $("#cmp-b").value];
  const positions = () => gridWindow(page.tokens().length, Number($("#lens-pos").value));
  fillShades($("#cmp-shade"));
  for (const id of ["#cmp-a", "#cmp-b"]) {
    $(id).addEventListener("change", () => {
      choices(page.models());
      page.redraw();
    });
  }
  return {
    controls: ["#cmp-layer", "#cmp-head", "#cmp-shade", "#cmp-lens"],
    key: () => `${pair()}/${$("#cmp-layer").value}/${positions()}/${$("#cmp-lens").value}`,
    request: () => Promise.all(pair().map(async (model) => ({
      model,
      lens: await api.lens(page.text(), { positions: positions(), top_k: 5, model,
                                          lens: $("#cmp-lens").value === "jacobian" ? "jacobian" : undefined }),
      attention: await api.attention(page.text(), Number($("#cmp-layer").value), null, model),
    }))),
    draw: (data, readout) => drawCompare(data, readout, {
      head: Number($("#cmp-head").value),
      shade: $("#cmp-shade").value,
      selectHead: (head) => {
        $("#cmp-head").value = head;
        page.redraw();
      },
    }),
    name: () => `compare-${pair().join("-")}-L${$("#cmp-layer").value}-H${$("#cmp-head").value}`,
  };
}

// data: [{model, lens, attention}] (two). Each part keeps its own hover readout; a head tile
// calls selectHead(head).
function drawCompare(data, readout, { head, shade, selectHead }) {
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
