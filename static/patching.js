// Patching view: activation patching between a clean and a corrupt prompt (POST /patch as a job),
// drawn as a diverging layer x position (or layer x head) heatmap of the recovery. Before anything
// is sent, both prompts are tokenized side by side and a length mismatch is explained.
import * as api from "./api.js";
import { $, make, options } from "./dom.js";
import { jobView } from "./jobs.js";
import { colourBar, diverging, el, figure, fmt, heatmap, readable, showToken } from "./svg.js";

const LEFT = 48, TOP = 84;
const SITES = {
  resid_pre: "residual stream entering each block",
  attn_out: "attention output of each block",
  mlp_out: "MLP output of each block",
  heads: "each head's output (hook_z) at every position",
  heads_by_position: "each head's output at one position",
};

function inputs() {
  return {
    clean: $("#patch-clean").value, corrupt: $("#patch-corrupt").value,
    answer: api.tokenSpec($("#patch-answer").value), distractor: api.tokenSpec($("#patch-distractor").value),
    site: $("#patch-site").value, direction: $("#patch-direction").value,
  };
}

// The target as a formula: logit(" Mary") − logit(" John"), or log P(" Mary").
function metricLabel(data) {
  const a = JSON.stringify(data.answer.token);
  return data.metric === "logit_diff" ? `logit(${a}) − logit(${JSON.stringify(data.distractor.token)})` : `log P(${a})`;
}

// The clean and corrupt tokens side by side (differing positions marked) and what /patch will
// say about their lengths, before anything is sent.
async function comparePrompts() {
  const clean = $("#patch-clean").value, corrupt = $("#patch-corrupt").value;
  const note = $("#patch-lengths"), table = $("#patch-pair");
  let a, b;
  try {
    [a, b] = (await Promise.all([api.tokenize(clean), api.tokenize(corrupt)])).map((r) => r.tokens);
  } catch (err) {
    note.textContent = `Cannot tokenize: ${err.message}`;
    note.className = "hint mismatch";
    table.replaceChildren();
    return;
  }
  if (clean !== $("#patch-clean").value || corrupt !== $("#patch-corrupt").value) return;  // edited meanwhile
  const n = Math.max(a.length, b.length);
  const differ = [...Array(n).keys()].filter((i) => a[i]?.token_id !== b[i]?.token_id);
  const at = (i) => `clean ${JSON.stringify(a[i]?.token_str ?? "(end)")}, corrupt ${JSON.stringify(b[i]?.token_str ?? "(end)")}`;
  if (a.length !== b.length) {
    note.textContent = `clean has ${a.length} tokens, corrupt ${b.length}; first difference at position ` +
                       `${differ[0]} (${at(differ[0])}). Patching needs the same number of tokens.`;
  } else if (!differ.length) {
    note.textContent = `${a.length} tokens each, and identical: every patch would change nothing.`;
  } else {
    note.textContent = `${a.length} tokens each; they differ at position${differ.length > 1 ? "s" : ""} ` +
                       `${differ.join(", ")}` + (differ.length === 1 ? ` (${at(differ[0])})` : "") + ".";
  }
  note.className = a.length === b.length ? "hint" : "hint mismatch";
  const row = (label, cells) => {
    const tr = make("tr");
    tr.append(make("th", { textContent: label }), ...cells);
    return tr;
  };
  const tokens = (list) => [...Array(n).keys()].map((i) => make("td", {
    textContent: list[i] ? showToken(list[i].token_str, 16) : "", className: differ.includes(i) ? "differs" : "",
    title: list[i] ? `#${i} · id ${list[i].token_id}` : `no token #${i}`,
  }));
  table.replaceChildren(row("#", [...Array(n).keys()].map((i) => make("td", { textContent: String(i) }))),
                        row(`clean (${a.length})`, tokens(a)), row(`corrupt (${b.length})`, tokens(b)));
}

// The position a heads_by_position grid is shown at: the one with the largest total |value|.
function busiestPosition(grid) {
  const totals = grid[0][0].map((_, p) => grid.flat().reduce((sum, row) => sum + Math.abs(row[p]), 0));
  return totals.indexOf(Math.max(...totals));
}

let positionsOf = null;  // the answer the position selector was filled from

// heads_by_position: the position selector, filled from a new answer's tokens.
function syncPosition(data) {
  const select = $("#patch-position"), byPos = data.site === "heads_by_position";
  $("#patch-position-label").hidden = !byPos;
  if (!byPos || positionsOf === data) return;
  options(select, data.positions.map((t, p) => [String(p), `#${p} ${showToken(t, 16)}`]),
          String(busiestPosition(data.recovery ?? data.effect)));
  positionsOf = data;
}

// The view (see app.js's TABS); the prompts are compared as they are typed.
export function patchingView(page) {
  let site = "", timer;
  for (const id of ["#patch-clean", "#patch-corrupt"]) {
    $(id).addEventListener("input", () => {
      clearTimeout(timer);
      timer = setTimeout(comparePrompts, 250);
    });
  }
  comparePrompts();
  return jobView({
    prefix: "patch", redraw: page.redraw, controls: ["#patch-position"],
    hint: "Press Run to patch every cell (a job: the bar shows its progress).",
    read: inputs,
    starts: (i) => [() => api.startPatch(i.clean, i.corrupt, i.answer, i.distractor, i.site, i.direction)],
    finish: ([data], status) => {
      status.textContent = `done: ${data.cells_computed} cells run` + (data.warning ? `; ${data.warning}` : "");
      return data;
    },
    draw: (data, readout) => {
      site = data.site;
      syncPosition(data);
      return drawPatching(data, readout, Number($("#patch-position").value));
    },
    name: () => `patching-${site}`,
  });
}

// values: [rows][cols] of the shown grid; the heatmap with tokens (or heads) on the x axis.
function drawPatching(data, readout, position) {
  const byPos = data.site === "heads_by_position", heads = data.site.startsWith("heads");
  const shown = data.recovery ?? data.effect;
  const base = api.baseMetric(data);
  const values = byPos ? shown.map((row) => row.map((cell) => cell[position])) : shown;
  const effect = byPos ? data.effect.map((row) => row.map((cell) => cell[position])) : data.effect;
  // Without a recovery (clean and corrupt metrics equal), colour the change of the metric.
  const colourOf = data.recovery ? (v) => v : (v) => v - base;
  const nRows = values.length, nCols = values[0].length;
  const max = Math.max(data.recovery ? 1 : 0, ...values.flat().map((v) => Math.abs(colourOf(v))), 1e-9);
  const w = Math.max(22, Math.min(48, Math.floor(900 / nCols))), h = 20;
  const columns = heads ? data.columns : data.tokens_clean;
  const differs = data.tokens_clean.map((t, i) => t !== data.tokens_corrupt[i]);
  const labelH = heads ? 24 : 86;
  const W = Math.max(LEFT + nCols * w + 40, 920), H = TOP + nRows * h + labelH + 44;
  const svg = figure(W, H, `Activation patching, ${data.site}, ${data.direction}`);
  const where = byPos ? ` at #${position} ${showToken(data.tokens_clean[position], 16)}` : "";
  svg.append(
    el("text", { x: 8, y: 20, "font-size": 14, "font-weight": 600 },
       `Patching ${SITES[data.site]}${where} (${data.direction}): ` +
       `${data.recovery ? "recovery" : "metric change"} of ${metricLabel(data)}`),
    el("text", { x: 8, y: 38, fill: "#555", "font-size": 11 },
       `clean ${fmt(data.clean_metric)}, corrupt ${fmt(data.corrupt_metric)}; ` +
       (data.recovery ? "recovery = (patched − corrupt) / (clean − corrupt): blue 1 restores the clean answer, red pushes the other way"
                      : data.warning)),
    el("text", { x: 8, y: 54, fill: "#555", "font-size": 11 },
       `${data.cells_computed} cells run; the others patch an activation equal to the base run's.` +
       (heads ? "" : " Underlined: positions where the prompts differ.")));
  const scale = diverging(max);
  const cells = heatmap(svg, values.map((row) => row.map(colourOf)), {
    x: LEFT, y: TOP, w, h, scale, cls: "patch-cell",
    rowLabels: data.rows,
    colLabels: columns.map((c) => (heads ? c : showToken(c, 12))),
    rotate: !heads,
  });
  if (!heads) {
    differs.forEach((d, p) => d && svg.append(el("line", { x1: LEFT + p * w + 2, x2: LEFT + (p + 1) * w - 3,
      y1: TOP + nRows * h + 3, y2: TOP + nRows * h + 3, stroke: "#d62728", "stroke-width": 2, class: "differs" })));
  }
  svg.append(colourBar(LEFT + 40, TOP + nRows * h + labelH + 12, 200, scale, data.recovery ? "recovery" : "metric change"));
  readable(svg, cells, nCols, (i) => {
    const r = Math.floor(i / nCols), c = i % nCols;
    let what = heads ? `${data.rows[r]} ${columns[c]}${where}` : `${data.rows[r]} · #${c} ${showToken(columns[c], 24)}`;
    if (!heads && differs[c]) what += ` (corrupt ${showToken(data.tokens_corrupt[c], 24)})`;
    const rec = data.recovery ? `recovery ${fmt(values[r][c])} · ` : "";
    return `${what}: ${rec}metric ${fmt(effect[r][c])}`;
  }, readout);
  return svg;
}
