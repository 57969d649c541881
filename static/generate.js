// Generate view: the page's text continued token by token (POST /generate, streamed), each
// token a chip coloured by its logprob or entropy; optionally steered (ActAdd, mean difference or
// pasted values) with the unsteered completion and the per-step KL beneath. Generate starts a
// stream, Cancel aborts it; clicking a token of a finished generation analyses the sequence at it
// in the other views (the page's token-ids mode).
import * as api from "./api.js";
import { $ } from "./dom.js";
import { ORANGES, colourBar, el, figure, fmt, inkOn, readable, rgb, sequential, showToken } from "./svg.js";

const COLS = 12, CELL_W = 76, CELL_H = 22, GAP = 4, KL_H = 10, LABEL = 78, TOP = 34;

// The steering vector the panel describes, or null (its fields are empty).
function vector() {
  const kind = $("#gen-kind").value;
  if (kind === "values") {
    const values = $("#gen-values").value.split(/[\s,[\]]+/).filter(Boolean).map(Number);
    return values.length ? { kind, values } : null;
  }
  const positive = $("#gen-positive").value, negative = $("#gen-negative").value;
  if (!positive && !negative) return null;
  if (kind === "actadd") return { kind, positive, negative };
  const lines = (value) => value.split("\n").filter(Boolean);
  return { kind, positive: lines(positive), negative: lines(negative) };
}

// The request of the controls as they are when Generate is pressed. Stop strings: separated by
// "|", "\n" standing for a newline.
function read(text) {
  const body = { prompt: text, max_new_tokens: Number($("#gen-max").value) };
  if ($("#gen-mode").value === "sample") {
    Object.assign(body, { do_sample: true, temperature: Number($("#gen-temperature").value),
                          seed: Number($("#gen-seed").value) });
    if ($("#gen-top-k").value) body.top_k = Number($("#gen-top-k").value);
    if ($("#gen-top-p").value) body.top_p = Number($("#gen-top-p").value);
  }
  const stop = $("#gen-stop").value.split("|").filter(Boolean).map((s) => s.replaceAll("\\n", "\n"));
  if (stop.length) body.stop = stop;
  const v = vector();
  if (v) {
    const addition = { layer: Number($("#gen-layer").value), vector: v, coefficient: Number($("#gen-coefficient").value) };
    if (v.kind !== "actadd") addition.positions = $("#gen-positions").value;  // actadd: its first positions
    if ($("#gen-unit").checked) addition.unit = true;
    body.steer = [addition];
    if ($("#gen-compare").checked) body.compare = true;
  }
  return body;
}

// The view (see app.js's TABS). Like jobs.js's jobView, a finished answer is kept (tab switches
// and other texts only redraw it) and only Generate computes again, from the controls and text as
// they are when it starts (at once, unless the text is still being analyzed); while the stream
// runs, the view draws its partial answer (the page's tokens as the prompt) after every token. A
// cancelled stream's data is that partial answer, finish_reason "cancelled".
export function generateView(page) {
  const run = $("#gen-run"), cancel = $("#gen-cancel"), status = $("#gen-status");
  const gen = { wanted: false, version: 0, done: null, pending: null, controller: null, partial: null };
  const samples = () => document.querySelectorAll("#panel-generate .sample-only")
    .forEach((n) => { n.hidden = $("#gen-mode").value !== "sample"; });
  $("#gen-mode").addEventListener("change", samples);
  samples();
  const kinds = () => document.querySelectorAll("#gen-steer [data-kinds]")
    .forEach((n) => { n.hidden = !n.dataset.kinds.split(" ").includes($("#gen-kind").value); });
  $("#gen-kind").addEventListener("change", kinds);
  kinds();
  run.addEventListener("click", () => {
    gen.wanted = true;
    gen.version += 1;
    page.redraw();
  });
  cancel.addEventListener("click", () => gen.controller?.abort());

  const panel = $("#panel-generate");
  // A finished generation's tokens select themselves in the other views (its ids, as generated);
  // the one they analyse is outlined.
  const draw = (data, readout) => {
    const at = page.selected();
    return drawGeneration(data, readout, {
      by: $("#gen-colour").value, bosLabel: page.isBos,
      selected: at && String(at.ids) === String(data.token_ids) ? at.position : null,
      select: data.token_ids && ((position) => page.inspect(data.token_ids, data.text, position)),
    });
  };
  const drawPartial = () => panel.querySelector(".figure-box").replaceChildren(draw(gen.partial, panel.querySelector(".readout")));
  // Mid-stream the page has no answer to redraw yet (its redraw would blank the figure): the
  // partial one is redrawn here.
  $("#gen-colour").addEventListener("change", () => (gen.partial ? drawPartial() : page.redraw()));

  function start() {
    const body = read(page.text()), version = gen.version;
    const partial = {
      prompt: page.tokens().map((t) => ({ index: t.index, token: t.token_str, token_id: t.token_id })),
      generated: [], ...(body.compare ? { unsteered: { generated: [] }, kl: [] } : {}),
    };
    gen.partial = partial;
    gen.controller = new AbortController();
    run.disabled = true;
    cancel.disabled = false;
    status.textContent = "generating…";
    // A step's event has the steered (or only) token, the unsteered one, or both (one row may end
    // first, at a stop string or EOS); events with neither report building the steering vectors.
    const onEvent = (kind, data) => {
      if (kind !== "progress" || !(data.token || data.unsteered_token)) return;
      if (data.token) partial.generated.push(data.token);
      if (data.kl !== undefined) partial.kl.push(data.kl);
      if (data.unsteered_token) partial.unsteered.generated.push(data.unsteered_token);
      status.textContent = `generating… ${partial.generated.length} of ${body.max_new_tokens}`;
      drawPartial();
    };
    const finish = (data, line) => {
      status.textContent = line;
      gen.done = { version, data };
      return data;
    };
    return api.generateStream(body, onEvent, gen.controller.signal).then(
      (result) => finish(result, `${result.generated.length} tokens, finish: ${result.finish_reason}`),
      (err) => {
        if (err.name === "AbortError") {
          return finish({ ...partial, finish_reason: "cancelled" },
                        `cancelled after ${partial.generated.length} tokens`);
        }
        status.textContent = "failed: see the error above";
        throw err;  // to the page's error banner
      }).finally(() => {
      gen.pending = gen.controller = gen.partial = null;
      gen.wanted = false;
      run.disabled = false;
      cancel.disabled = true;
    });
  }

  return {
    key: () => String(gen.version),
    request: () => {
      if (gen.done?.version === gen.version) return Promise.resolve(gen.done.data);
      if (!gen.pending && !gen.wanted) {
        status.textContent = "Press Generate to continue the text above.";
        return Promise.resolve(null);
      }
      gen.pending ??= start();
      return gen.pending;
    },
    draw,
    name: () => "generate",
  };
}

// A row of token chips from column 0 at (x, y), one per step: `g.CLS` with the token id, its text
// `show(t)`; the one at position `selected` outlined; clicking one calls `select(position)`.
function chips(svg, tokens, y, cls, colour, { show = (t) => showToken(t.token, 10), selected = null, select } = {}) {
  return tokens.map((t, i) => {
    const fill = colour(t), position = t.position ?? t.index, outlined = position === selected;
    const chip = el("g", { class: cls, transform: `translate(${LABEL + (i % COLS) * CELL_W} ${y(i)})`,
                           "data-token-id": t.token_id, "data-position": position },
      el("rect", { width: CELL_W - GAP, height: CELL_H, rx: 3, fill: rgb(fill),
                   ...(outlined ? { stroke: "#d62728", "stroke-width": 2 } : {}) }),
      el("text", { x: 4, y: CELL_H / 2, "dominant-baseline": "middle", fill: inkOn(fill) }, show(t)));
    if (select) {
      chip.setAttribute("cursor", "pointer");
      chip.addEventListener("click", () => select(position));
    }
    svg.append(chip);
    return chip;
  });
}

const label = (svg, y, text) => svg.append(
  el("text", { x: 8, y: y + CELL_H / 2, "dominant-baseline": "middle", fill: "#555", "font-size": 11 }, text));

function describeStep(t, step, row) {
  const alternatives = t.alternatives.map((a) => `${JSON.stringify(a.token)} ${fmt(a.probability, { digits: 3 })}`);
  return `${row} step ${step + 1} (#${t.position}) ${JSON.stringify(t.token)} (id ${t.token_id}): ` +
         `logprob ${fmt(t.logprob)}, entropy ${fmt(t.entropy)} nats; alternatives: ${alternatives.join(", ")}`;
}

// The prompt's chips in grey, then the generated ones COLS to a line: each line the generated
// (steered) row, with a comparison the unsteered row and the KL strip below it. by: the colour
// (logprob | entropy); bosLabel(index, id): whether a prompt token is labelled BOS; selected: the
// position outlined; select(position): a click on a prompt or generated (steered) token, if any.
function drawGeneration(data, readout, { by, bosLabel, selected, select }) {
  const steps = data.generated, unsteered = data.unsteered?.generated, kl = data.kl;
  const values = [...steps, ...(unsteered ?? [])].map((t) => t[by]);
  const scale = by === "logprob"
    ? sequential(0, { lo: Math.min(...values, 0) })
    : sequential(Math.max(...values, 1e-9), { stops: ORANGES });
  const klScale = kl && sequential(Math.max(...kl, 1e-9), { stops: ORANGES });
  const promptLines = Math.ceil(data.prompt.length / COLS);
  const lineH = (CELL_H + GAP) * (unsteered ? 2 : 1) + (kl ? KL_H + GAP : 0) + 8;
  const genTop = TOP + promptLines * (CELL_H + GAP) + 10;
  const lines = Math.max(1, Math.ceil(Math.max(steps.length, unsteered?.length ?? 0) / COLS));  // either may end first
  const W = LABEL + COLS * CELL_W + 8, H = genTop + lines * lineH + 44;
  const svg = figure(W, H, "Generated tokens");
  const finish = data.finish_reason ? `finish: ${data.finish_reason}` : "generating…";
  const steering = (data.steering ?? []).map((s) => ` · steered at L${s.layer} ${s.site} (${s.kind} × ${s.coefficient})`);
  svg.append(el("text", { x: 8, y: 18, "font-size": 14, "font-weight": 600 },
                `${steps.length} generated tokens (${finish}) · colour: ${by}${steering.join("")}`));

  label(svg, TOP, "prompt");
  const bos = (t) => bosLabel(t.index, t.token_id);
  const prompt = chips(svg, data.prompt, (i) => TOP + Math.floor(i / COLS) * (CELL_H + GAP), "prompt-token",
                       () => [233, 236, 239], { show: (t) => (bos(t) ? "BOS" : showToken(t.token, 10)), selected, select });
  const lineY = (i) => genTop + Math.floor(i / COLS) * lineH;
  for (let l = 0; l < lines; l++) {
    label(svg, genTop + l * lineH, unsteered ? "steered" : "generated");
    if (unsteered) label(svg, genTop + l * lineH + CELL_H + GAP, "unsteered");
  }
  const colour = (t) => scale.colour(t[by]);
  const generated = chips(svg, steps, lineY, "gen-token", colour, { selected, select });
  const others = unsteered ? chips(svg, unsteered, (i) => lineY(i) + CELL_H + GAP, "unsteered-token", colour) : [];
  const klCells = (kl ?? []).map((v, i) => {
    const cell = el("rect", { class: "kl-cell", x: LABEL + (i % COLS) * CELL_W, y: lineY(i) + 2 * (CELL_H + GAP),
                              width: CELL_W - GAP, height: KL_H, fill: rgb(klScale.colour(v)) });
    svg.append(cell);
    return cell;
  });
  for (let l = 0; kl && l < lines; l++) {
    svg.append(el("text", { x: 8, y: genTop + l * lineH + 2 * (CELL_H + GAP) + KL_H - 1, fill: "#555", "font-size": 10 },
                  "KL"));
  }
  svg.append(colourBar(LABEL + 20, H - 34, 200, scale, `${by} (nats)`));
  if (kl) svg.append(colourBar(LABEL + 420, H - 34, 200, klScale, "KL(steered ‖ unsteered), nats"));

  const describe = [
    ...data.prompt.map((t) => () => `prompt #${t.index} ${JSON.stringify(t.token)} (id ${t.token_id})` +
                                    (bos(t) ? " (beginning of sequence)" : "")),
    ...steps.map((t, i) => () => describeStep(t, i, unsteered ? "steered" : "generated")),
    ...(unsteered ?? []).map((t, i) => () => describeStep(t, i, "unsteered")),
    ...(kl ?? []).map((v, i) => () => `step ${i + 1}: KL(steered ‖ unsteered) = ${fmt(v)} nats`),
  ];
  readable(svg, [...prompt, ...generated, ...others, ...klCells], COLS, (i) => describe[i](), readout);
  svg.addEventListener("keydown", (event) => {  // Enter: select the keyboard cursor's token, as a click
    const chip = svg.querySelector("g.current:is(.prompt-token, .gen-token)");
    if (event.key === "Enter" && select && chip) select(Number(chip.dataset.position));
  });
  return svg;
}
