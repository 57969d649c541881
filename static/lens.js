// Logit lens view: for one position, each layer's top-k next-token guesses (the residual stream
// read through the final layer norm and unembedding), as a layers x top-k table of bars.
// The grid mode: see lensgrid.js. The Lens switch reads either through a loaded Jacobian lens
// (each layer first mapped into the output's basis); with a target the grid's chart then also
// draws the logit lens's probability curve. The Fit button fits a Jacobian lens as a job.
import * as api from "./api.js";
import { tokenSpec } from "./api.js";
import { $, options } from "./dom.js";
import { jobControls } from "./jobs.js";
import { drawLensGrid, fillShades, gridWindow, lensTitle } from "./lensgrid.js";
import { el, figure, percent, readable, showToken } from "./svg.js";

const ROW_LABEL = 64, CELL_W = 150, ROW_H = 28, TOP = 58;

const grid = () => $("#lens-mode").value === "grid";

// The request fields of the Lens switch: {} for the logit lens (the original requests).
const lensFields = () => {
  const value = $("#lens-kind").value;
  return value === "logit" ? {} : { lens: "jacobian", jlens: value.slice("jacobian:".length) };
};

// The switch's options: the logit lens, every Jacobian lens GET /model lists as loaded, and those
// saved for the model but not loaded yet (the server loads one when it is first asked for;
// `select`: the one to choose, else the current choice if still there).
async function fillLenses(select = $("#lens-kind").value) {
  const info = await api.getModel();
  const saved = (info.lenses_available ?? []).filter((a) => a.kind === "file" && !a.loaded);
  const items = [["logit", "logit"], ...info.lenses.map((l) => [`jacobian:${l.name}`, `Jacobian: ${l.name}`]),
                 ...saved.map((a) => [`jacobian:${a.name}`, `Jacobian: ${a.name} (saved)`])];
  options($("#lens-kind"), items, items.some(([v]) => v === select) ? select : "logit");
}

// The Fit button: texts (one per line) and a name in, a progress bar and Cancel while the job runs;
// once done, the new lens is chosen and the view redrawn through it.
function fitControls(page) {
  const { button, status, run } = jobControls("jlens");
  button.addEventListener("click", async () => {
    const texts = $("#jlens-texts").value.split("\n").map((t) => t.trim()).filter((t) => t);
    const name = $("#jlens-name").value.trim();
    button.disabled = true;
    try {
      const [state] = await run([() => api.startJlensFit(texts, name)],
                                (s) => `${s.status}: ${s.texts_done ?? 0} of ${texts.length} texts fitted`);
      if (state.status === "done") {
        status.textContent = `done: lens ${state.result.name} fitted on ${state.result.texts} texts, ` +
                             `saved at ${state.result.path}`;
        await fillLenses(`jacobian:${state.result.name}`);
        page.redraw();
      } else {
        status.textContent = state.status === "cancelled" ? "cancelled" : `failed: ${state.error}`;
      }
    } catch (err) {
      status.textContent = `failed: ${err.message}`;
    } finally {
      button.disabled = false;
    }
  });
}

// The view (see app.js's TABS), in either mode. The grid refetches only for another window,
// target or lens: shade and position just redraw.
export function lensView(page) {
  const position = () => Number($("#lens-pos").value);
  const positions = () => gridWindow(page.tokens().length, position());
  fillShades($("#lens-shade"));
  $("#lens-mode").addEventListener("change", () => {
    document.querySelectorAll("#panel-lens .grid-only").forEach((n) => { n.hidden = !grid(); });
    document.querySelectorAll("#panel-lens .position-only").forEach((n) => { n.hidden = grid(); });
    page.redraw();
  });
  $("#model-select").addEventListener("change", () => fillLenses().catch(() => {}));
  fillLenses().catch(() => {});  // a failure shows on the page's first requests anyway
  fitControls(page);
  return {
    controls: ["#lens-pos", "#lens-k", "#lens-shade", "#lens-target", "#lens-kind"],
    key: () => `${$("#lens-kind").value}/` +
      (grid() ? `grid/${positions()}/${$("#lens-target").value}` : `${position()}/${$("#lens-k").value}`),
    request: async () => {
      const lens = lensFields();
      if (!grid()) return api.predict(page.text(), position(), Number($("#lens-k").value), lens);
      const body = { positions: positions(), target: tokenSpec($("#lens-target").value), top_k: 5 };
      const data = await api.lens(page.text(), { ...body, ...lens });
      // a Jacobian grid with a target: the logit lens's curve too, on the same chart
      if (lens.lens && data.target) data.logit_target = (await api.lens(page.text(), body)).target;
      return data;
    },
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
  const svg = figure(W, H, `${lensTitle(data)} at position ${data.token_index}`);
  svg.append(
    el("text", { x: 8, y: 20, "font-size": 14, "font-weight": 600, class: "lens-title" },
       `${lensTitle(data)} after #${data.token_index} ${showToken(data.token_str, 30)}: next-token top ${k} by layer`),
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
