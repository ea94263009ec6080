// Library view: upload (file picker or drag and drop), embedding progress, the photo grid.

import { api, isAbort, waitForJobs } from "./api.js";
import {
  $,
  busy,
  clear,
  el,
  formatBytes,
  jobProgress,
  plural,
  setAlert,
  showRejections,
  toast,
} from "./dom.js";
import { Thumbs } from "./thumbs.js";
import { openViewer } from "./viewer.js";

const PAGE = 48;
// Files per request: the API takes an upload all or nothing, so a big drop goes in batches.
const BATCH = 50;

const thumbs = new Thumbs();
let cursor = null;
let shown = 0;
let generation = 0; // bumped by every reload: pages of an older listing are dropped
let uploading = false;

export function setupLibrary() {
  const input = $("library-files");
  input.addEventListener("change", () => {
    const files = [...input.files];
    if (files.length) upload(files).finally(() => (input.value = ""));
  });
  dropTarget($("library-drop"), (files) => upload(files));
  $("library-refresh").addEventListener("click", () => loadLibrary());
  $("library-more").addEventListener("click", () => loadPage());
}

/** Make `zone` accept dropped files (`onFiles(files)`), highlighted while dragging over it. */
export function dropTarget(zone, onFiles) {
  let depth = 0;
  zone.addEventListener("dragenter", (event) => {
    event.preventDefault();
    depth += 1;
    zone.classList.add("dragging");
  });
  zone.addEventListener("dragover", (event) => {
    event.preventDefault();
    if (event.dataTransfer) event.dataTransfer.dropEffect = "copy";
  });
  zone.addEventListener("dragleave", () => {
    depth = Math.max(0, depth - 1);
    if (depth === 0) zone.classList.remove("dragging");
  });
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    depth = 0;
    zone.classList.remove("dragging");
    const files = [...(event.dataTransfer?.files || [])];
    if (files.length) onFiles(files);
  });
}

export function resetLibrary() {
  generation += 1;
  thumbs.clear();
  cursor = null;
  shown = 0;
  clear($("library-grid"));
  clear($("library-upload"));
  setAlert($("library-error"), "");
  showRejections($("library-rejections"), null);
}

/** Reload the grid from the first page. */
export async function loadLibrary() {
  generation += 1;
  thumbs.clear();
  cursor = null;
  shown = 0;
  clear($("library-grid"));
  await loadPage();
}

async function loadPage() {
  const mine = generation;
  await busy([$("library-more"), $("library-refresh")], async () => {
    try {
      const page = await api.get("/images", { limit: PAGE, cursor });
      if (mine !== generation) return;
      for (const image of page.items) $("library-grid").append(card(image));
      shown += page.items.length;
      cursor = page.next_cursor;
      setAlert($("library-error"), "");
    } catch (error) {
      if (!isAbort(error) && mine === generation) setAlert($("library-error"), error.message);
    }
  });
  if (mine !== generation) return;
  $("library-more").hidden = !cursor;
  $("library-count").textContent = cursor
    ? `${shown} shown, more below`
    : plural(shown, "photo");
}

function card(image) {
  const name = image.filename || "untitled";
  const img = el("img", { alt: name, width: 160, height: 160, decoding: "async" });
  const remove = el(
    "button",
    {
      type: "button",
      className: "button small danger icon",
      title: "Delete",
      attrs: { "aria-label": `Delete ${name}` },
    },
    el("img", { src: "trash.svg", alt: "", width: 16, height: 16 }),
  );
  const item = el(
    "li",
    { className: "card", dataset: { imageId: image.id } },
    el(
      "button",
      {
        type: "button",
        className: "thumb",
        title: `${image.width}×${image.height} · ${formatBytes(image.size_bytes)}`,
        attrs: { "aria-label": `Open ${name}` },
        on: { click: () => openViewer(image) },
      },
      img,
    ),
    el("div", { className: "name", text: name, attrs: { title: name } }),
    el(
      "div",
      { className: "card-actions" },
      el("span", {
        className: image.embedded ? "badge good" : "badge",
        text: image.embedded ? "searchable" : "embedding…",
      }),
      remove,
    ),
  );
  remove.addEventListener("click", () => removeImage(image, item, img, remove));
  thumbs.attach(img, image.thumbnail_url);
  return item;
}

async function removeImage(image, item, img, button) {
  const name = image.filename || "this photo";
  if (!window.confirm(`Delete “${name}”? It also leaves the search index.`)) return;
  await busy(button, async () => {
    try {
      await api.del(`/images/${encodeURIComponent(image.id)}`);
      thumbs.release(img);
      item.remove();
      shown -= 1;
      $("library-count").textContent = cursor ? `${shown} shown, more below` : plural(shown, "photo");
      toast(`Deleted ${name}.`);
      $("library-refresh").focus();
    } catch (error) {
      if (!isAbort(error)) setAlert($("library-error"), error.message);
    }
  });
}

async function upload(files) {
  if (uploading) {
    toast("An upload is still running; drop more photos when it is done.");
    return;
  }
  uploading = true;
  try {
    await uploadNow(files);
  } finally {
    uploading = false;
  }
}

async function uploadNow(files) {
  const status = clear($("library-upload"));
  setAlert($("library-error"), "");
  showRejections($("library-rejections"), null);
  const batches = [];
  for (let i = 0; i < files.length; i += BATCH) batches.push(files.slice(i, i + BATCH));
  const jobs = [];
  let added = 0;
  const duplicates = [];
  const failures = [];
  const messages = [];
  await busy([$("library-files")], async () => {
    const sending = el("p", { text: `Uploading ${plural(files.length, "file")}…` });
    status.append(sending);
    for (const [n, batch] of batches.entries()) {
      const form = new FormData();
      for (const file of batch) form.append("files", file, file.name);
      try {
        const body = await api.post("/images", { form });
        for (const image of body.images) {
          if (image.duplicate) duplicates.push(image.filename || image.id);
          else added += 1;
        }
        if (body.job) jobs.push(body.job.id);
      } catch (error) {
        if (isAbort(error)) return;
        const where = batches.length > 1 ? `Batch ${n + 1} of ${batches.length}: ` : "";
        failures.push(error);
        messages.push(`${where}${error.message}`);
        setAlert($("library-error"), messages.join("\n"));
        showRejections($("library-rejections"), mergeRejections(failures));
      }
    }
    sending.textContent = uploadSummary(added, duplicates, failures.length, batches.length);
    if (duplicates.length) {
      status.append(
        el("p", {
          className: "muted small duplicates",
          text: `Already in your library: ${duplicates.join(", ")}`,
        }),
      );
    }
    if (jobs.length) {
      const progress = jobProgress(`Embedding ${plural(added, "new photo")}`);
      status.append(progress.node);
      try {
        const done = await waitForJobs(jobs, (job) => progress.update(job));
        const failed = done.filter((job) => job.state === "failed");
        if (failed.length) {
          progress.done("Embedding failed.");
          setAlert($("library-error"), failed.map((job) => job.error?.message).join("\n"));
        } else {
          progress.done(`Done: ${plural(added, "new photo")} searchable.`);
        }
      } catch (error) {
        if (isAbort(error)) return;
        setAlert($("library-error"), error.message);
      }
    }
  });
  if (added || duplicates.length) await loadLibrary();
}

function uploadSummary(added, duplicates, failed, batches) {
  const parts = [`Uploaded ${plural(added, "new photo")}`];
  if (duplicates.length) parts.push(plural(duplicates.length, "duplicate"));
  if (failed) parts.push(`${failed} of ${plural(batches, "batch", "batches")} rejected`);
  return `${parts.join(", ")}.`;
}

function mergeRejections(errors) {
  const files = errors.flatMap((error) => error.detail?.files || []);
  return { detail: { files } };
}
