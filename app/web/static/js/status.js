// Index view: what the serving model can search, and a rebuild that embeds what it lacks.

import { api, isAbort, waitForJob } from "./api.js";
import { $, busy, clear, el, jobProgress, setAlert, toast } from "./dom.js";

let polling = null; // id of the rebuild job being polled

export function setupStatus() {
  $("index-refresh").addEventListener("click", () => loadStatus());
  $("index-rebuild").addEventListener("click", () => rebuild());
}

export function resetStatus() {
  clear($("index-stats"));
  clear($("index-progress"));
  setAlert($("index-error"), "");
  polling = null;
}

export async function loadStatus() {
  await busy($("index-refresh"), async () => {
    try {
      const status = await api.get("/index");
      render(status);
      setAlert($("index-error"), "");
      if (status.rebuild_job) follow(status.rebuild_job);
    } catch (error) {
      if (!isAbort(error)) setAlert($("index-error"), error.message);
    }
  });
}

function render(status) {
  const stats = clear($("index-stats"));
  const item = (key, term, value) =>
    stats.append(
      el("div", { className: "stat", dataset: { stat: key } }, el("dt", { text: term }),
        el("dd", { text: String(value) })),
    );
  item("images", "Images", status.images);
  item("embedded", "Searchable", status.embedded);
  item("pending", "Pending", status.pending);
  item("with_regions", `With regions (${status.region_layout})`, status.with_regions);
  item("model", "Model", status.model);
}

async function rebuild() {
  setAlert($("index-error"), "");
  await busy($("index-rebuild"), async () => {
    try {
      const answer = await api.post("/index/rebuild");
      if (!answer.created) toast("A rebuild is already running; following it.");
      await follow(answer.job);
    } catch (error) {
      if (!isAbort(error)) setAlert($("index-error"), error.message);
    }
  });
}

async function follow(job) {
  if (polling === job.id) return;
  polling = job.id;
  const box = clear($("index-progress"));
  const progress = jobProgress("Rebuilding the index");
  box.append(progress.node);
  $("index-rebuild").disabled = true;
  try {
    const done = await waitForJob(job.id, (j) => progress.update(j));
    if (done.state === "failed") {
      progress.done("Rebuild failed.");
      setAlert($("index-error"), done.error?.message || "the rebuild failed");
    } else {
      progress.done("Rebuild finished.");
    }
    const status = await api.get("/index");
    render(status);
  } catch (error) {
    if (!isAbort(error)) setAlert($("index-error"), error.message);
  } finally {
    polling = null;
    $("index-rebuild").disabled = false;
  }
}
