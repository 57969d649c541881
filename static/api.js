// The viewer's only contact with the server: one function per JSON endpoint.
// A minimal reference client: every request is JSON, every failure is an ApiError carrying the
// server's own `{"error": ...}` message, every answer its provenance.

export class ApiError extends Error {
  constructor(message, status) {
    super(message);
    this.status = status;
  }
}

// The model requests go to (GET /models); null: the server's default, and no "model" field is
// sent, so a one-model server sees exactly the original requests.
let chosenModel = null;
export const chooseModel = (name) => { chosenModel = name; };

// A text given as its token ids: a generated sequence, analysed as generated (decoding and
// re-tokenizing it does not always give the same tokens). `text`: its decoded text, for show.
export class TokenIds {
  constructor(ids, text) {
    this.ids = ids;
    this.text = text;
  }
}

// Any function below takes a TokenIds wherever it takes a text: `call` sends it as the field's
// ids (text -> token_ids, clean -> clean_ids, ...; in a list of texts, the list of ids).
const IDS_FIELDS = { text: "token_ids", clean: "clean_ids", corrupt: "corrupt_ids", prompt: "prompt_ids" };
const ids = (value) => (value instanceof TokenIds ? value.ids : value);
const withIds = (body) => Object.fromEntries(Object.entries(body).map(([field, value]) => (
  value instanceof TokenIds && field in IDS_FIELDS ? [IDS_FIELDS[field], value.ids]
    : [field, Array.isArray(value) ? value.map(ids) : value])));

async function call(method, path, body) {
  const init = { method, headers: { Accept: "application/json" } };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json"; // anything else is refused with 415
    // provenance: every answer says where it came from (model, software, request), so that the
    // view's exports can (views ignore the field; job results carry it anyway).
    init.body = JSON.stringify({ ...withIds(body), model: body.model ?? chosenModel ?? undefined, provenance: true });
  }
  let response;
  try {
    response = await fetch(path, init);
  } catch (err) {
    throw new ApiError(`cannot reach the server (${err.message})`, 0);
  }
  const data = await response.json().catch(() => null);
  if (!response.ok) {
    throw new ApiError(data?.error ?? `HTTP ${response.status} ${response.statusText}`, response.status);
  }
  return data;
}

// A token typed in a box: "" -> undefined, digits -> a token id, anything else as typed
// (leading spaces matter: " mat" and "mat" are different tokens).
export function tokenSpec(value) {
  if (value === "") return undefined;
  return /^\d+$/.test(value) ? Number(value) : value;
}

// Every answer and distractor is sent this one way: a token string or id, or null when there is
// none (no distractor: the metric is the answer's own log-probability or logit; no answer, where
// optional: the model's top-1).
const token = (value) => (value === undefined || value === "" ? null : value);

// {default, models: [<GET /model of each>]}
export const getModels = () => call("GET", "/models");

export const tokenize = (text) => call("POST", "/tokenize", { text });

// {saes: [{name, model, hook, layer, d_sae, ...}]}: every loaded SAE, of every model.
export const getSaes = () => call("GET", "/saes");

// A text read through an SAE (model: the SAE's, so an SAE of any loaded model can be read).
export const features = (text, sae, top_k = 10, model = undefined) =>
  call("POST", "/features", { text, sae, top_k, model });

// One feature; `extra`: answer, distractor, edit ("ablate" | "clamp"), value, positions, indices.
export const feature = (text, sae, index, extra = {}, model = undefined) =>
  call("POST", "/feature", { text, sae, index, top_k: 6, ...extra, model });

export const generate = (body) => call("POST", "/generate", body);

// token_indices omitted: the text's own tokens (no BOS, [CLS] or [SEP]).
export const trace = (text, token_indices) => call("POST", "/trace", { text, token_indices });

// head omitted (null): every head of the layer as [n_heads][T][T]. model: a loaded model's name
// (default: the chosen one).
export const attention = (text, layer, head = null, model = undefined) =>
  call("POST", "/attention", { text, layer, head, model });

// lens: {} (the logit lens, the original request) or {lens: "jacobian", jlens: NAME}.
export const predict = (text, token_index, top_k = 5, lens = {}) =>
  call("POST", "/predict", { text, token_index, top_k, ...lens });

// Logit lens grid: positions omitted = every position; target = a one-token string or a token id;
// lens, jlens: as for predict.
export const lens = (text, { positions, target, top_k = 1, model, lens, jlens } = {}) =>
  call("POST", "/lens", { text, positions, target, top_k, model, lens, jlens });

// GET /model of the chosen model (its `lenses`, after a fit).
export const getModel = () => call("GET", chosenModel ? `/model?model=${encodeURIComponent(chosenModel)}` : "/model");

// Fit a Jacobian lens on texts (a job; the lens is usable by name once it is done).
export const startJlensFit = (texts, name) => call("POST", "/jobs/jlens_fit", { texts, name });

// token_logprobs, perplexity and the next-token distribution of 1-16 texts (one padded batch).
export const score = (texts, temperature = 1, top_k = 5) => call("POST", "/score", { texts, temperature, top_k });

// Direct logit attribution; position null: the last token.
export const dla = (text, answer, distractor, position = null) =>
  call("POST", "/dla", { text, answer: token(answer), distractor: token(distractor), position });

// Which heads matter.
export const ablate = (text, answer, distractor, method = "mean", site = "heads") =>
  call("POST", "/ablate", { text, answer: token(answer), distractor: token(distractor), method, site });

// compare: the real /patch grid beside the estimate.
export const attributionPatch = (clean, corrupt, answer, distractor, site = "heads", compare = true) =>
  call("POST", "/attribution_patch",
       { clean, corrupt, answer: token(answer), distractor: token(distractor), site, compare });

// Long computations answer 202 {job} at once; jobs.js polls getJob(job) until its status is done,
// error or cancelled.
export const getJob = (job) => call("GET", `/jobs/${job}`);

export const cancelJob = (job) => call("DELETE", `/jobs/${job}`);

// Causal head gating.
export const startChg = (texts, targets, steps = 100) => call("POST", "/jobs/chg", { texts, targets, steps });

// The metric of the run a clean/corrupt grid patches (denoise: the corrupt run; noise: the clean
// one): every cell's effect is measured from it.
export const baseMetric = (grid) => grid.direction === "denoise" ? grid.corrupt_metric : grid.clean_metric;

// Activation patching; site: resid_pre | attn_out | mlp_out | heads | heads_by_position.
export const startPatch = (clean, corrupt, answer, distractor, site, direction) =>
  call("POST", "/patch", { clean, corrupt, answer: token(answer), distractor: token(distractor), site, direction,
                           async: true });

// ROME causal tracing of one kind: resid | mlp | attn.
export const startCausalTrace = (text, subject, answer, kind, samples) =>
  call("POST", "/causal_trace", { text, subject, answer: token(answer), kind, samples, async: true });

// POST /generate with "stream": true: calls `onEvent(kind, data)` for each server-sent event
// ("progress" per token, then "result") as it arrives, and resolves with the result's data. A
// request refused before the stream starts (400) or an "error" event throws an ApiError; aborting
// `signal` rejects with an AbortError, and the server, seeing the client leave, stops generating.
export async function generateStream(body, onEvent, signal) {
  const init = { method: "POST", signal, headers: { Accept: "text/event-stream", "Content-Type": "application/json" },
                 body: JSON.stringify({ ...withIds(body), model: chosenModel ?? undefined, provenance: true, stream: true }) };
  let response;
  try {
    response = await fetch("/generate", init);
  } catch (err) {
    if (err.name === "AbortError") throw err;
    throw new ApiError(`cannot reach the server (${err.message})`, 0);
  }
  if (!response.ok) {
    const data = await response.json().catch(() => null);
    throw new ApiError(data?.error ?? `HTTP ${response.status} ${response.statusText}`, response.status);
  }
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    // Events are blank-line separated blocks of "field: value" lines; the last may be incomplete.
    const blocks = buffer.split("\n\n");
    buffer = blocks.pop();
    for (const block of blocks) {
      const fields = Object.fromEntries(block.split("\n").map((line) => {
        const colon = line.indexOf(":");
        return [line.slice(0, colon), line.slice(colon + 1).trimStart()];
      }));
      const data = JSON.parse(fields.data);
      if (fields.event === "error") throw new ApiError(data.error, response.status);
      onEvent(fields.event, data);
      if (fields.event === "result") return data;
    }
  }
  throw new ApiError("the stream ended without a result", response.status);
}
