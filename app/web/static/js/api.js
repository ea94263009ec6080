// The JSON API client: the user's key, one error shape, abortable requests, job polling.
//
// Every error the API returns has the shape {"error": {"code", "message", "detail"?}}; it is
// thrown as an ApiError whose message is the API's own, ready to show to the user.

const KEY_STORAGE = "polar.apiKey";

// The API lives where the UI's folder does: /ui/ is served by the API at <base>/ui/.
const API_BASE = new URL("../", document.baseURI);

export class ApiError extends Error {
  constructor(status, code, message, detail) {
    super(message);
    this.name = "ApiError";
    this.status = status;
    this.code = code;
    this.detail = detail;
  }
}

export const isAbort = (error) => error?.name === "AbortError";

// One controller per signed-in session: signing out aborts every request and poll in flight.
let session = new AbortController();
let unauthorizedHandler = () => {};

export function getKey() {
  try {
    return localStorage.getItem(KEY_STORAGE);
  } catch {
    return null;
  }
}

export function onUnauthorized(handler) {
  unauthorizedHandler = handler;
}

/** Check a key against the API, then keep it. Throws the API's 401 error for a bad key. */
export async function signIn(key) {
  await request("GET", "/concepts", { query: { limit: 1 }, key, quiet: true });
  localStorage.setItem(KEY_STORAGE, key);
}

export function signOut() {
  localStorage.removeItem(KEY_STORAGE);
  session.abort();
  session = new AbortController();
}

export function apiUrl(path, query) {
  const url = new URL(path.replace(/^\//, ""), API_BASE);
  for (const [name, value] of Object.entries(query || {})) {
    if (value !== undefined && value !== null && value !== "") {
      url.searchParams.set(name, String(value));
    }
  }
  return url;
}

async function errorFrom(response) {
  let body = null;
  try {
    body = await response.json();
  } catch {
    // not JSON (a proxy's error page): fall through to the status line
  }
  const error = body?.error;
  if (error && typeof error.message === "string") {
    return new ApiError(response.status, error.code || "error", error.message, error.detail);
  }
  const line = `${response.status} ${response.statusText}`.trim();
  return new ApiError(response.status, `http_${response.status}`, `The server answered ${line}.`);
}

/**
 * One API call. `query`: URL parameters; `json`: a JSON body; `form`: a FormData body; `key`: a
 * key to try instead of the stored one; `as`: "json" (default) or "blob".
 */
export async function request(method, path, options = {}) {
  const { query, json, form, key, as = "json", quiet = false } = options;
  const signal = session.signal;
  const headers = { Accept: as === "json" ? "application/json" : "*/*" };
  const token = key ?? getKey();
  if (token) headers.Authorization = `Bearer ${token}`;
  let body;
  if (json !== undefined) {
    headers["Content-Type"] = "application/json";
    body = JSON.stringify(json);
  } else if (form !== undefined) {
    body = form; // the browser sets the multipart boundary
  }
  let response;
  try {
    response = await fetch(apiUrl(path, query), {
      method,
      headers,
      body,
      signal,
      cache: as === "json" ? "no-store" : "default",
      credentials: "omit",
    });
  } catch (error) {
    if (isAbort(error)) throw error;
    throw new ApiError(0, "network_error", `Cannot reach the server (${error.message}).`);
  }
  if (!response.ok) {
    const error = await errorFrom(response);
    if (response.status === 401 && !quiet) {
      // The key stopped working: the handler signs out and says why; callers see an abort.
      // Requests of the same session that were in flight get 401s too: only the first one
      // signs out (it aborted the session), so its reason is the one the user reads.
      if (!signal.aborted) unauthorizedHandler(error);
      throw new DOMException(error.message, "AbortError");
    }
    throw error;
  }
  if (as === "blob") return response.blob();
  if (response.status === 204) return null;
  return response.json();
}

/**
 * POST a FormData with upload progress (fetch cannot report it): `onProgress(sent, total)` in
 * bytes. Same errors as request(): ApiError with the API's message, aborts on sign-out.
 */
export function upload(path, form, onProgress = () => {}) {
  const signal = session.signal;
  return new Promise((resolve, reject) => {
    if (signal.aborted) return reject(new DOMException("signed out", "AbortError"));
    const xhr = new XMLHttpRequest();
    xhr.open("POST", apiUrl(path));
    xhr.setRequestHeader("Accept", "application/json");
    const token = getKey();
    if (token) xhr.setRequestHeader("Authorization", `Bearer ${token}`);
    xhr.responseType = "text";
    xhr.upload.addEventListener("progress", (event) => {
      if (event.lengthComputable) onProgress(event.loaded, event.total);
    });
    const abort = () => xhr.abort();
    signal.addEventListener("abort", abort, { once: true });
    xhr.addEventListener("abort", () => reject(new DOMException("signed out", "AbortError")));
    xhr.addEventListener("error", () =>
      reject(new ApiError(0, "network_error", "Cannot reach the server (the upload failed).")),
    );
    xhr.addEventListener("load", async () => {
      signal.removeEventListener("abort", abort);
      const response = new Response(xhr.status === 204 ? null : xhr.responseText, {
        status: xhr.status,
        statusText: xhr.statusText,
      });
      if (response.ok) {
        resolve(xhr.status === 204 ? null : await response.json());
        return;
      }
      const error = await errorFrom(response);
      if (response.status === 401) {
        if (!signal.aborted) unauthorizedHandler(error); // the first 401 of a session only
        reject(new DOMException(error.message, "AbortError"));
        return;
      }
      reject(error);
    });
    xhr.send(form);
  });
}

/** Whether the synthetic demo model serves (GET /readyz, public), and why. */
export async function serving() {
  const response = await fetch(apiUrl("/readyz"), { cache: "no-store", credentials: "omit" });
  return response.json();
}

export const api = {
  get: (path, query, options) => request("GET", path, { ...options, query }),
  post: (path, options) => request("POST", path, options),
  patch: (path, json) => request("PATCH", path, { json }),
  put: (path, json) => request("PUT", path, { json }),
  del: (path) => request("DELETE", path),
  blob: (path) => request("GET", path, { as: "blob" }),
  upload: (path, form, onProgress) => upload(path, form, onProgress),
};

export function sleep(ms) {
  const signal = session.signal;
  return new Promise((resolve, reject) => {
    if (signal.aborted) return reject(new DOMException("signed out", "AbortError"));
    const timer = setTimeout(resolve, ms);
    signal.addEventListener(
      "abort",
      () => {
        clearTimeout(timer);
        reject(new DOMException("signed out", "AbortError"));
      },
      { once: true },
    );
  });
}

export const FINISHED = new Set(["succeeded", "failed"]);

/** Poll GET /jobs/{id} until the job finishes; `onUpdate(job)` sees every state. */
export async function waitForJob(jobId, onUpdate = () => {}, interval = 400) {
  for (;;) {
    const job = await api.get(`/jobs/${encodeURIComponent(jobId)}`);
    onUpdate(job);
    if (FINISHED.has(job.state)) return job;
    await sleep(interval);
  }
}

/** Poll several jobs at once; `onUpdate` gets their mean progress and the jobs. */
export async function waitForJobs(jobIds, onUpdate = () => {}, interval = 400) {
  const latest = new Map();
  for (;;) {
    const open = jobIds.filter((id) => !FINISHED.has(latest.get(id)?.state));
    const jobs = await Promise.all(open.map((id) => api.get(`/jobs/${encodeURIComponent(id)}`)));
    for (const job of jobs) latest.set(job.id, job);
    const all = jobIds.map((id) => latest.get(id));
    const progress = all.reduce((sum, job) => sum + job.progress, 0) / Math.max(1, all.length);
    const running = all.some((job) => !FINISHED.has(job.state));
    onUpdate({ progress, state: running ? "running" : "succeeded" }, all);
    if (!running) return all;
    await sleep(interval);
  }
}
