// The viewer's only contact with the server: one function per JSON endpoint.
// A minimal reference client: every request is JSON, every failure is an ApiError carrying the
// server's own `{"error": ...}` message.

export class ApiError extends Error {
  constructor(message, status) {
    super(message);
    this.status = status;
  }
}

async function call(method, path, body) {
  const init = { method, headers: { Accept: "application/json" } };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json"; // anything else is refused with 415
    init.body = JSON.stringify(body);
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

export const getModel = () => call("GET", "/model");

export const tokenize = (text) => call("POST", "/tokenize", { text });

// token_indices omitted: every token but BOS.
export const trace = (text, token_indices) => call("POST", "/trace", { text, token_indices });

// head omitted (null): every head of the layer as [n_heads][T][T].
export const attention = (text, layer, head = null) => call("POST", "/attention", { text, layer, head });

export const predict = (text, token_index, top_k = 5) => call("POST", "/predict", { text, token_index, top_k });
