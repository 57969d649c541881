// Long computations (`"async": true` requests and POST /jobs/chg): start jobs, poll GET /jobs/{id}
// into a progress bar and a status line, cancel them with a button. Shared by every view that
// runs jobs, so polling lives here only.
import * as api from "./api.js";

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

// Wires a <progress>, a status element and a Cancel button; returns `run(starts, describe)`,
// which calls each `start()` (a request answering 202 {job}), polls the jobs together (the bar
// shows their mean progress, the status line `describe(state)` of the latest update) and
// resolves with their final states. Cancel stops every job of the current run. A start that
// fails (a 400) cancels the jobs already started and throws its error.
export function jobControls(bar, status, cancel) {
  let jobs = [];
  cancel.disabled = true;
  cancel.addEventListener("click", () => jobs.forEach((job) => api.cancelJob(job).catch(() => {})));
  return async function run(starts, describe = (state) => `${state.status} ${Math.round(state.progress * 100)}%`) {
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
  };
}

// The results of finished jobs; null if any was cancelled; throws the first job's error.
export function results(states) {
  const failed = states.find((s) => s.status === "error");
  if (failed) throw new Error(failed.error ?? "the job failed");
  return states.every((s) => s.status === "done") ? states.map((s) => s.result) : null;
}
