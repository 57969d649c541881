// Heads view: which heads matter, four ways on one layer x head heatmap: ablation effect (/ablate),
// attribution estimate and real patching (one /attribution_patch answer with compare), and CHG
// gates (a POST /jobs/chg job, polled, with its taxonomy drawn over the cells). Attribution and
// patching also show their scatter and correlation.
import * as api from "./api.js";
import { jobControls } from "./jobs.js";
import { blues, el, figure, fmt, readable, rgb } from "./svg.js";

const $ = (selector) => document.querySelector(selector);

export const IOI = {
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

const chg = { result: null, text: "", version: 0, running: false };

function inputs() {
  return {
    mode: $("#heads-show").value, answer: $("#heads-answer").value,
    distractor: $("#heads-distractor").value || null, method: $("#heads-method").value,
    corrupt: $("#heads-corrupt").value, stage: $("#heads-stage").value,
  };
}

// Blue for negative, red for positive, white at 0; `max` is the largest magnitude shown.
function diverging(value, max) {
  const t = Math.max(-1, Math.min(1, value / (max || 1)));
  const [r, g, b] = t < 0 ? [33, 102, 172] : [178, 24, 43];
  const f = Math.abs(t);
  return rgb([255 + (r - 255) * f, 255 + (g - 255) * f, 255 + (b - 255) * f].map(Math.round));
}

// What each mode draws: a [n_layers][n_heads] grid of numbers, its colour, a title.
function grids(data, { mode, stage }) {
  if (mode === "ablation") return { values: data.effect };
  if (mode === "chg") return { values: data.gates[stage], roles: data.taxonomy, sequential: true };
  const base = data.direction === "denoise" ? data.corrupt_metric : data.clean_metric;
  const estimate = data.attribution;
  const exact = data.exact_effect.map((row) => row.map((v) => v - base));
  return { values: mode === "attribution" ? estimate : exact, estimate, exact };
}

// The view (see app.js's `views`); `currentText()` is the analyzed text.
export const headsView = (currentText) => ({
  key: () => {
    const i = inputs();
    if (i.mode === "ablation") return `ablate/${i.answer}/${i.distractor}/${i.method}`;
    if (i.mode === "chg") return `chg/${chg.version}`;
    return `attribution/${i.corrupt}/${i.answer}/${i.distractor}`;  // one answer serves both modes
  },
  request: () => {
    const i = inputs(), text = currentText();
    if (i.mode === "ablation") return api.ablate(text, i.answer, i.distractor, i.method);
    if (i.mode === "chg") {
      if (chg.result && chg.text === text) return Promise.resolve(chg.result);
      $("#heads-status").textContent = "Press Train CHG to learn the gates for this text and answer.";
      return Promise.resolve(null);
    }
    if (!i.corrupt) {
      $("#heads-status").textContent = "Enter a corrupt prompt with as many tokens as the text (try the IOI example).";
      return Promise.resolve(null);
    }
    return api.attributionPatch(text, i.corrupt, i.answer, i.distractor);
  },
  draw: (data, readout) => drawHeads(data, inputs(), readout),
  name: () => `heads-${$("#heads-show").value}`,
});

export function drawHeads(data, options, readout) {
  const { values, roles, sequential, estimate, exact } = grids(data, options);
  const nLayers = values.length, nHeads = values[0].length;
  const cell = Math.max(14, Math.min(36, Math.floor(560 / Math.max(nHeads, nLayers))));
  const gridW = nHeads * cell, gridH = nLayers * cell;
  const scatter = Boolean(estimate);
  const side = LEFT + gridW + (scatter ? 90 : 36);  // where the scatter or the taxonomy legend starts
  const W = Math.max(620, side + (scatter ? SCATTER + 20 : 190));
  const H = TOP + Math.max(gridH + 56, scatter ? SCATTER + 44 : 0, roles ? 110 : 0) + 8;
  const max = Math.max(...values.flat().map(Math.abs));
  const color = (v) => (sequential ? rgb(blues(v)) : diverging(v, max));
  const svg = figure(W, H, `Heads: ${MODES[options.mode]}`);
  const what = options.mode === "chg" ? `${MODES.chg}, stage ${options.stage}` : `${MODES[options.mode]}, ${data.metric}`;
  svg.append(el("text", { x: 8, y: 20, "font-size": 14, "font-weight": 600 }, `Layer x head: ${what}`),
             el("text", { x: 8, y: 38, fill: "#555", "font-size": 11 }, options.mode === "chg"
               ? "Gates in [0, 1]; marks: the CHG taxonomy from the final G- and G+ (threshold 0.5)."
               : "Blue: the change lowers the metric; red: it raises it."));

  const cells = [];
  const heat = el("g", { transform: `translate(${LEFT} ${TOP})` });
  values.forEach((row, l) => row.forEach((v, h) => {
    const rect = el("rect", { x: h * cell, y: l * cell, width: cell - 1, height: cell - 1, fill: color(v),
                              class: "cell head-cell", "data-layer": l, "data-head": h });
    heat.append(rect);
    cells.push(rect);
    const role = roles?.[l][h];
    if (role) {
      rect.setAttribute("data-role", role);
      if (ROLES[role].mark) heat.append(...roleMark(role, h * cell, l * cell, cell));
    }
  }));
  for (let h = 0; h < nHeads; h += Math.ceil(12 / cell)) {
    heat.append(el("text", { x: h * cell + cell / 2, y: -6, "text-anchor": "middle", "font-size": 10 }, `H${h}`));
  }
  for (let l = 0; l < nLayers; l += Math.ceil(12 / cell)) {
    heat.append(el("text", { x: -6, y: l * cell + cell / 2, "text-anchor": "end", "dominant-baseline": "middle",
                             "font-size": 10 }, `L${l}`));
  }
  // Colour scale under the heatmap.
  const steps = 20, barW = Math.max(gridW, 160) / steps;
  const bar = el("g", { transform: `translate(0 ${gridH + 14})` });
  for (let i = 0; i < steps; i++) {
    const v = sequential ? i / (steps - 1) : (2 * i / (steps - 1) - 1) * max;
    bar.append(el("rect", { x: i * barW, width: barW + 0.5, height: 10, fill: color(v) }));
  }
  bar.append(el("text", { x: 0, y: 24, "font-size": 10 }, sequential ? "0" : fmt(-max)),
             el("text", { x: steps * barW, y: 24, "font-size": 10, "text-anchor": "end" }, sequential ? "1" : fmt(max)));
  heat.append(bar);
  svg.append(heat);

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
                                 fill: rgb(blues(0.35 + 0.65 * layer / Math.max(1, estimate.length - 1))),
                                 stroke: "#fff", "stroke-width": 0.5 });
    g.append(point);
    return point;
  });
  svg.append(g);
  return points;
}

// CHG: start a job on the current text and answer, poll it into the progress bar, cancel it.
export function setUpHeads(currentText, redraw) {
  const status = $("#heads-status");
  const run = jobControls($("#heads-progress"), status, $("#heads-cancel"));
  $("#heads-example").addEventListener("click", () => {
    $("#heads-corrupt").value = IOI.corrupt;
    $("#heads-answer").value = IOI.answer;
    $("#heads-distractor").value = IOI.distractor;
    $("#text").value = IOI.clean;
    $("#input-form").requestSubmit();
  });
  $("#heads-train").addEventListener("click", async () => {
    const text = currentText(), { answer } = inputs();
    $("#heads-train").disabled = true;
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
        redraw();
      } else {
        status.textContent = state.error ?? state.status;
      }
    } catch (err) {
      status.textContent = err.message;
    } finally {
      chg.running = false;
      $("#heads-train").disabled = false;
    }
  });
  for (const id of ["#heads-show", "#heads-method", "#heads-stage", "#heads-answer", "#heads-distractor", "#heads-corrupt"]) {
    $(id).addEventListener("change", () => {
      status.textContent = chg.running ? status.textContent : "";
      syncControls();
      redraw();
    });
  }
  syncControls();
}

// Show only the controls the chosen mode uses.
function syncControls() {
  const mode = $("#heads-show").value;
  document.querySelectorAll("#panel-heads [data-for]").forEach((node) => {
    node.hidden = !node.dataset.for.split(" ").includes(mode);
  });
}
