// Heads view: which heads matter, four ways on one layer x head heatmap: ablation effect (/ablate),
// attribution estimate and real patching (one /attribution_patch answer with compare), and CHG
// gates (a POST /jobs/chg job, polled, with its taxonomy drawn over the cells). Attribution and
// patching also show their scatter and correlation.
import * as api from "./api.js";
import { $ } from "./dom.js";
import { jobControls } from "./jobs.js";
import { colourBar, diverging, el, figure, fmt, heatmap, readable, rgb, sequential } from "./svg.js";

const IOI = {
  clean: "When Mary and John went to the store, John gave a drink to",
  corrupt: "When Mary and John went to the store, Mary gave a drink to",
  answer: " Mary", distractor: " John",
};
const MODES = {
  ablation: "ablation effect (metric change)",
  attribution: "attribution estimate (metric change)",
  patching: "real patching (metric change)",
  chg: "CHG gate",
};
const ROLES = {  // the CHG taxonomy as a categorical overlay
  facilitating: { mark: "F", color: "#1b7837" },
  interfering: { mark: "I", color: "#c51b7d" },
  irrelevant: { mark: "", color: "#999" },
  ambiguous: { mark: "?", color: "#762a83" },
};
const LEFT = 44, TOP = 84, SCATTER = 300;
const UNIT = sequential(1);  // gates; in the scatter, points darken with the layer

const chg = { result: null, text: "", version: 0, running: false };

function inputs() {
  return {
    mode: $("#heads-show").value, answer: $("#heads-answer").value,
    distractor: $("#heads-distractor").value, method: $("#heads-method").value,
    corrupt: $("#heads-corrupt").value, stage: $("#heads-stage").value,
  };
}

// What each mode draws: a [n_layers][n_heads] grid of numbers (gates: on the sequential scale,
// the rest diverging), the CHG taxonomy, the scatter's two grids.
function grids(data, { mode, stage }) {
  if (mode === "ablation") return { values: data.effect };
  if (mode === "chg") return { values: data.gates[stage], roles: data.taxonomy, gates: true };
  const base = api.baseMetric(data);
  const estimate = data.attribution;
  const exact = data.exact_effect.map((row) => row.map((v) => v - base));
  return { values: mode === "attribution" ? estimate : exact, estimate, exact };
}

// The view (see app.js's TABS). CHG: a job on the current text and answer, polled into the
// progress bar, cancellable; its answer is kept until the next training.
export function headsView(page) {
  const { button, status, run } = jobControls("heads");
  $("#heads-example").addEventListener("click", () => {
    $("#heads-corrupt").value = IOI.corrupt;
    $("#heads-answer").value = IOI.answer;
    $("#heads-distractor").value = IOI.distractor;
    $("#text").value = IOI.clean;
    $("#input-form").requestSubmit();
  });
  button.addEventListener("click", async () => {
    const text = page.text(), { answer } = inputs();
    button.disabled = true;
    chg.running = true;
    try {
      const [state] = await run([() => api.startChg([text], [answer], Number($("#heads-steps").value))], (s) => (
        s.stage ? `${s.status}: ${s.stage}, step ${s.step}/${s.steps}` +
                  (s.loss === null ? "" : `, loss ${s.loss.toFixed(3)}`)
                : s.status));
      if (state.status === "done") {
        Object.assign(chg, { result: state.result, text, version: chg.version + 1 });
        const c = state.result.counts;
        status.textContent = `done: ${c.facilitating} facilitating, ${c.interfering} interfering, ` +
                             `${c.irrelevant} irrelevant, ${c.ambiguous} ambiguous`;
        $("#heads-show").value = "chg";
        page.redraw();
      } else {
        status.textContent = state.error ?? state.status;
      }
    } catch (err) {
      status.textContent = err.message;
    } finally {
      chg.running = false;
      button.disabled = false;
    }
  });
  for (const id of ["#heads-show", "#heads-method", "#heads-stage", "#heads-answer", "#heads-distractor", "#heads-corrupt"]) {
    $(id).addEventListener("change", () => {
      status.textContent = chg.running ? status.textContent : "";
      syncControls();
      page.redraw();
    });
  }
  syncControls();
  return {
    key: () => {
      const i = inputs();
      if (i.mode === "ablation") return `ablate/${i.answer}/${i.distractor}/${i.method}`;
      if (i.mode === "chg") return `chg/${chg.version}`;
      return `attribution/${i.corrupt}/${i.answer}/${i.distractor}`;  // one answer serves both modes
    },
    request: () => {
      const i = inputs(), text = page.text();
      if (i.mode === "ablation") return api.ablate(text, i.answer, i.distractor, i.method);
      if (i.mode === "chg") {
        if (chg.result && chg.text === text) return Promise.resolve(chg.result);
        status.textContent = "Press Train CHG to learn the gates for this text and answer.";
        return Promise.resolve(null);
      }
      if (!i.corrupt) {
        status.textContent = "Enter a corrupt prompt with as many tokens as the text (try the IOI example).";
        return Promise.resolve(null);
      }
      return api.attributionPatch(text, i.corrupt, i.answer, i.distractor);
    },
    draw: (data, readout) => drawHeads(data, inputs(), readout),
    name: () => `heads-${$("#heads-show").value}`,
  };
}

function drawHeads(data, options, readout) {
  const { values, roles, gates, estimate, exact } = grids(data, options);
  const nLayers = values.length, nHeads = values[0].length;
  const cell = Math.max(14, Math.min(36, Math.floor(560 / Math.max(nHeads, nLayers))));
  const gridW = nHeads * cell, gridH = nLayers * cell;
  const scatter = Boolean(estimate);
  // where the scatter or the taxonomy legend starts: right of the heatmap and its colour bar
  const side = LEFT + Math.max(gridW, 220) + (scatter ? 90 : 36);
  const W = Math.max(620, side + (scatter ? SCATTER + 20 : 190));
  const H = TOP + Math.max(gridH + 56, scatter ? SCATTER + 44 : 0, roles ? 110 : 0) + 8;
  const scale = gates ? UNIT : diverging(Math.max(...values.flat().map(Math.abs)));
  const svg = figure(W, H, `Heads: ${MODES[options.mode]}`);
  const what = options.mode === "chg" ? `${MODES.chg}, stage ${options.stage}` : `${MODES[options.mode]}, ${data.metric}`;
  svg.append(el("text", { x: 8, y: 20, "font-size": 14, "font-weight": 600 }, `Layer x head: ${what}`),
             el("text", { x: 8, y: 38, fill: "#555", "font-size": 11 }, options.mode === "chg"
               ? "Gates in [0, 1]; marks: the CHG taxonomy from the final G- and G+ (threshold 0.5)."
               : "Blue: the change raises the metric; red: it lowers it."));
  const cells = heatmap(svg, values, {
    x: LEFT, y: TOP, w: cell, h: cell, scale, cls: "head-cell", above: true,
    rowLabels: values.map((_, l) => `L${l}`), colLabels: values[0].map((_, h) => `H${h}`),
    attrs: (l, h) => ({ "data-layer": l, "data-head": h, ...(roles && { "data-role": roles[l][h] }) }),
  });
  if (roles) {
    const marks = el("g", { transform: `translate(${LEFT} ${TOP})` });
    roles.forEach((row, l) => row.forEach((role, h) => marks.append(...roleMark(role, h * cell, l * cell, cell))));
    svg.append(marks);
  }
  svg.append(colourBar(LEFT + 40, TOP + gridH + 14, Math.max(gridW - 80, 120), scale));

  if (roles) {
    const legend = el("g", { transform: `translate(${side} ${TOP})` });
    Object.keys(ROLES).forEach((role, i) => {
      legend.append(el("rect", { y: i * 24, width: 18, height: 18, fill: "#fff", stroke: "#ccc" }),
                    ...roleMark(role, 0, i * 24, 19),
                    el("text", { x: 26, y: i * 24 + 9, "dominant-baseline": "middle" },
                       `${role} (${data.counts[role]})`));
    });
    svg.append(legend);
  }
  const points = scatter ? drawScatter(svg, data, estimate, exact, side) : [];
  readable(svg, cells, nHeads, (i) => {
    const l = Math.floor(i / nHeads), h = i % nHeads;
    let text = `L${l} H${h}: ${MODES[options.mode]} ${fmt(values[l][h])}`;
    if (scatter) text += ` (estimate ${fmt(estimate[l][h])}, real ${fmt(exact[l][h])})`;
    if (roles) {
      const g = (stage) => data.gates[stage][l][h].toFixed(3);
      text += ` · ${roles[l][h]} (G- ${g("toward_zero")}, G+ ${g("toward_one")})`;
    }
    return text;
  }, readout);
  points.forEach((point, i) => point.addEventListener("mouseenter", () => cells[i].dispatchEvent(new Event("mouseenter"))));
  return svg;
}

// A taxonomy mark over a cell at (x, y): a coloured frame and a letter (none for irrelevant).
function roleMark(role, x, y, cell) {
  const { mark, color } = ROLES[role];
  if (!mark) return [];
  return [el("rect", { x: x + 1, y: y + 1, width: cell - 3, height: cell - 3, fill: "none", stroke: color,
                       "stroke-width": 2, "pointer-events": "none" }),
          el("text", { x: x + cell / 2, y: y + cell / 2, "text-anchor": "middle", "dominant-baseline": "central",
                       "font-weight": 700, fill: color, "font-size": Math.min(14, cell - 4), "pointer-events": "none" },
             mark)];
}

// Attribution estimate (y) against real patching (x), one point per head, with y = x.
function drawScatter(svg, data, estimate, exact, x0) {
  const xs = exact.flat(), ys = estimate.flat();
  const lo = Math.min(...xs, ...ys), hi = Math.max(...xs, ...ys);
  const span = hi - lo || 1;
  const pos = (v) => ((v - lo) / span) * SCATTER;
  const g = el("g", { transform: `translate(${x0} ${TOP})` });
  const r = data.pearson === null ? "undefined (a constant grid)" : data.pearson.toFixed(3);
  g.append(
    el("rect", { width: SCATTER, height: SCATTER, fill: "none", stroke: "#ccc" }),
    el("line", { x1: 0, y1: SCATTER, x2: SCATTER, y2: 0, stroke: "#bbb", "stroke-dasharray": "4 3" }),
    el("text", { x: 0, y: -26, "font-weight": 600, class: "heads-correlation" }, `Pearson r = ${r}`),
    el("text", { x: 0, y: -10, fill: "#555", "font-size": 11 }, `max abs error ${fmt(data.max_abs_error)}; dashed: y = x`),
    el("text", { x: SCATTER / 2, y: SCATTER + 30, "text-anchor": "middle", "font-size": 11 }, "real patching (metric change)"),
    el("text", { transform: `translate(-34 ${SCATTER / 2}) rotate(-90)`, "text-anchor": "middle", "font-size": 11 },
       "attribution estimate"),
    el("text", { x: 0, y: SCATTER + 14, "font-size": 10, fill: "#555" }, fmt(lo)),
    el("text", { x: SCATTER, y: SCATTER + 14, "font-size": 10, fill: "#555", "text-anchor": "end" }, fmt(hi)),
  );
  const points = xs.map((x, i) => {
    const layer = Math.floor(i / estimate[0].length);
    const point = el("circle", { cx: pos(x), cy: SCATTER - pos(ys[i]), r: 4, class: "scatter-point",
                                 fill: rgb(UNIT.colour(0.35 + 0.65 * layer / Math.max(1, estimate.length - 1))),
                                 stroke: "#fff", "stroke-width": 0.5 });
    g.append(point);
    return point;
  });
  svg.append(g);
  return points;
}

// Show only the controls the chosen mode uses.
function syncControls() {
  const mode = $("#heads-show").value;
  document.querySelectorAll("#panel-heads [data-for]").forEach((node) => {
    node.hidden = !node.dataset.for.split(" ").includes(mode);
  });
}
