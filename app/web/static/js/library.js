// Library view: upload (file picker or drag and drop), embedding progress, the photo grid.

import { api, isAbort, waitForJobs } from "./api.js";
import {
  $,
  busy,
  byteProgress,
  clear,
  el,
  formatBytes,
  formatDate,
  jobProgress,
  plural,
  setAlert,
  showRejections,
  toast,
} from "./dom.js";
import { selectBox } from "./selection.js";
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
let listing = []; // the images in the grid, in its order (the viewer's previous and next)

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
  listing = [];
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
  listing = [];
  clear($("library-grid"));
  await loadPage();
}

async function loadPage() {
  const mine = generation;
  await busy([$("library-more"), $("library-refresh")], async () => {
    try {
      // Newest first: what was just added or scanned is what a person looks for.
      const page = await api.get("/images", { limit: PAGE, cursor, order: "newest" });
      if (mine !== generation) return;
      for (const image of page.items) $("library-grid").append(card(image));
      listing.push(...page.items);
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
        on: {
          click: () => openViewer(image, "", listing.map((shownImage) => ({ image: shownImage }))),
        },
      },
      img,
    ),
    el("div", { className: "name", text: name, attrs: { title: name } }),
    el(
      "div",
      { className: "card-info" },
      el("span", {
        className: image.embedded ? "badge good" : "badge",
        text: image.embedded ? "searchable" : "embedding…",
      }),
      image.library_id
        ? el("span", {
            className: "badge source",
            text: "folder",
            attrs: { title: "Indexed in place from a folder on the server" },
          })
        : null,
      image.taken_at
        ? el("span", { className: "taken muted", text: `Taken ${formatDate(image.taken_at)}` })
        : null,
    ),
    el("div", { className: "card-actions" }, selectBox(image, name), remove),
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
      listing = listing.filter((other) => other.id !== image.id);
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
  let changed = false;
  try {
    changed = await uploadNow(files);
  } finally {
    uploading = false; // the upload is over once its summary shows: the next drop is taken
  }
  if (changed) await loadLibrary();
}

/**
 * Send `files` in batches, the way the CLI does: the API takes a request all or nothing, so the
 * files it refuses (error.detail.files) are set aside with their reason and the rest of the batch
 * is sent again. Returns {bodies, rejected}; rejected positions count from 1 in `files`.
 */
export async function sendSkippingBad(files, onBytes) {
  const total = files.reduce((sum, file) => sum + file.size, 0);
  let done = 0;
  let size = BATCH;
  const pending = files.map((file, i) => ({ file, position: i + 1 }));
  const rejected = [];
  const bodies = [];
  while (pending.length) {
    const batch = pending.slice(0, size);
    const form = new FormData();
    for (const { file } of batch) form.append("files", file, file.name);
    // When each photo was taken, if its EXIF does not say: the file's time on this computer.
    for (const { file } of batch) form.append("modified_at", String(Math.max(0, file.lastModified)));
    const batchBytes = batch.reduce((sum, { file }) => sum + file.size, 0);
    try {
      const body = await api.upload("/images", form, (sent, all) =>
        onBytes(done + Math.min(batchBytes, (sent / Math.max(1, all)) * batchBytes), total),
      );
      bodies.push(body);
      done += batchBytes;
      pending.splice(0, batch.length);
    } catch (error) {
      if (isAbort(error)) throw error;
      const limit = error.code === "too_many_files" ? error.detail?.max_files : null;
      if (Number.isInteger(limit) && limit >= 1 && limit < batch.length) {
        size = limit;
        continue;
      }
      const bad = Array.isArray(error.detail?.files) ? error.detail.files : [];
      const indexes = new Set(bad.map((f) => f.index).filter((i) => i >= 0 && i < batch.length));
      if (!indexes.size) throw error; // not about particular files: stop and say why
      for (const f of bad) {
        const item = batch[f.index];
        if (!item) continue;
        rejected.push({ position: item.position, filename: item.file.name, message: f.message });
        done += item.file.size;
      }
      const keep = batch.filter((_, i) => !indexes.has(i));
      pending.splice(0, batch.length, ...keep);
    }
    onBytes(done, total);
  }
  rejected.sort((a, b) => a.position - b.position);
  return { bodies, rejected };
}

async function uploadNow(files) {
  const status = clear($("library-upload"));
  setAlert($("library-error"), "");
  showRejections($("library-rejections"), null);
  const jobs = [];
  let added = 0;
  const duplicates = [];
  await busy([$("library-files")], async () => {
    const sending = el("p", { text: `Uploading ${plural(files.length, "file")}…` });
    const bytes = byteProgress("Uploading");
    status.append(sending, bytes.node);
    let outcome;
    try {
      outcome = await sendSkippingBad(files, (sent, total) => bytes.update(sent, total));
    } catch (error) {
      if (isAbort(error)) return;
      bytes.node.remove();
      sending.textContent = "Upload stopped.";
      setAlert($("library-error"), error.message);
      return;
    }
    bytes.node.remove();
    for (const body of outcome.bodies) {
      for (const image of body.images) {
        if (image.duplicate) duplicates.push(image.filename || image.id);
        else added += 1;
      }
      if (body.job) jobs.push(body.job.id);
    }
    sending.textContent = uploadSummary(added, duplicates, outcome.rejected.length);
    if (outcome.rejected.length) {
      status.append(
        el("p", {
          className: "notice skipped",
          attrs: { role: "alert" },
          text:
            `${plural(outcome.rejected.length, "file")} skipped (listed below): not a photo the ` +
            "service can use. The others were uploaded.",
        }),
      );
      showRejections($("library-rejections"), { files: outcome.rejected });
    }
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
  return Boolean(added || duplicates.length);
}

function uploadSummary(added, duplicates, skipped) {
  const parts = [`Uploaded ${plural(added, "new photo")}`];
  if (duplicates.length) parts.push(plural(duplicates.length, "duplicate"));
  if (skipped) parts.push(`${skipped} skipped`);
  return `${parts.join(", ")}.`;
}
