// Long computations (`"async": true` requests and POST /jobs/chg): start jobs, poll GET /jobs/{id}
// into a progress bar and a status line, cancel them with a button. Shared by every view that
// runs jobs, so polling lives here only.
import * as api from "./api.js";
import { $, make } from "./dom.js";

const POLL_MS = 250;
const ENDED = ["done", "error", "cancelled"];

// Polls one job until it ends, calling `onUpdate(state)` after every GET; its final state.
async function poll(job, onUpdate) {
  let state;
  do {
    await new Promise((resolve) => setTimeout(resolve, POLL_MS));
    state = await api.getJob(job);
    onUpdate(state);
  } while (!ENDED.includes(state.status));
  return state;
}

// The Run (its text: the slot's data-label), Cancel and progress controls of a view that runs
// jobs, made in its empty <span class="job" id="PREFIX-job"> (ids PREFIX-run, PREFIX-cancel,
// PREFIX-progress), and its status line PREFIX-status after the toolbar, so every such view has
// the same ones. Returns them with `run(starts, describe)`, which calls each `start()` (a request
// answering 202 {job}), polls the jobs together (the bar shows their mean progress, the status
// line `describe(state)` of the latest update) and resolves with their final states. Cancel stops
// every job of the current run. A start that fails (a 400) cancels the jobs already started and
// throws its error.
export function jobControls(prefix) {
  const slot = $(`#${prefix}-job`);
  const button = make("button", { type: "button", id: `${prefix}-run`, textContent: slot.dataset.label ?? "Run" });
  const cancel = make("button", { type: "button", id: `${prefix}-cancel`, textContent: "Cancel", disabled: true });
  const bar = make("progress", { id: `${prefix}-progress`, max: 1, value: 0 });
  const status = make("p", { id: `${prefix}-status`, className: "hint status" }, { "aria-live": "polite" });
  slot.append(button, cancel, bar);
  slot.closest(".toolbar").after(status);
  let jobs = [];
  cancel.addEventListener("click", () => jobs.forEach((job) => api.cancelJob(job).catch(() => {})));
  async function run(starts, describe = (state) => `${state.status} ${Math.round(state.progress * 100)}%`) {
    bar.value = 0;
    jobs = [];
    try {
      for (const start of starts) jobs.push((await start()).job);
      cancel.disabled = false;
      const progress = jobs.map(() => 0);
      return await Promise.all(jobs.map((job, i) => poll(job, (state) => {
        progress[i] = state.progress;
        bar.value = progress.reduce((a, b) => a + b, 0) / progress.length;
        status.textContent = describe(state);
      })));
    } catch (err) {
      jobs.forEach((job) => api.cancelJob(job).catch(() => {}));
      throw err;
    } finally {
      jobs = [];
      cancel.disabled = true;
    }
  }
  return { button, status, run };
}

// The results of finished jobs; null if any was cancelled; throws the first job's error.
function results(states) {
  const failed = states.find((s) => s.status === "error");
  if (failed) throw new Error(failed.error ?? "the job failed");
  return states.every((s) => s.status === "done") ? states.map((s) => s.result) : null;
}

// A view (see app.js's TABS) drawn from jobs that its Run button (`jobControls(prefix)`) starts:
// `read()` takes the inputs when Run is pressed, `starts(inputs)` gives the requests that start
// the jobs, `finish` turns their results into the view's data (and may report in the status
// line). A finished answer is kept: tab switches and other texts only redraw it; only Run
// computes again.
export function jobView({ prefix, redraw, hint, read, starts, finish, ...view }) {
  const { button, status, run } = jobControls(prefix);
  const job = { inputs: null, pending: null, done: null, version: 0 };
  button.addEventListener("click", () => {
    button.disabled = true;
    job.inputs = read();
    job.version += 1;
    redraw();
  });
  return {
    ...view,
    key: () => String(job.version),
    request: () => {
      if (job.done?.version === job.version) return Promise.resolve(job.done.data);
      if (job.pending) return job.pending;
      if (!job.inputs) {
        status.textContent = hint;
        return Promise.resolve(null);
      }
      const version = job.version;
      job.pending = run(starts(job.inputs)).then((states) => {
        const done = results(states);
        if (!done) {
          status.textContent = "cancelled";
          return null;
        }
        job.done = { version, data: finish(done, status) };
        return job.done.data;
      }, (err) => {
        status.textContent = "failed: see the error above";
        throw err;  // to the page's error banner
      }).finally(() => {
        job.pending = job.inputs = null;
        button.disabled = false;
      });
      return job.pending;
    },
  };
}
