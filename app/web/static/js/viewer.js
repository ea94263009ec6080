// A modal dialog with one image at full size (the original, fetched with the key).

import { api, isAbort } from "./api.js";
import { $, formatBytes } from "./dom.js";

let current = null; // blob: URL shown now
let opened = 0; // which openViewer call the dialog shows
let sequence = []; // [{image, extra}] the photo belongs to (a grid's order), for previous/next
let position = -1; // where the shown photo is in `sequence`

function release() {
  if (current) URL.revokeObjectURL(current);
  current = null;
  $("viewer-img").removeAttribute("src");
}

export function setupViewer() {
  const dialog = $("viewer");
  $("viewer-close").addEventListener("click", () => dialog.close());
  dialog.addEventListener("close", release);
  // A click on the backdrop (the dialog element itself, outside its content) closes it.
  dialog.addEventListener("click", (event) => {
    if (event.target === dialog) dialog.close();
  });
  $("viewer-prev").addEventListener("click", () => step(-1));
  $("viewer-next").addEventListener("click", () => step(1));
  dialog.addEventListener("keydown", (event) => {
    if (event.key === "ArrowLeft") step(-1);
    else if (event.key === "ArrowRight") step(1);
  });
}

function step(delta) {
  const next = sequence[position + delta];
  if (next) openViewer(next.image, next.extra, sequence);
}

/**
 * Show an image (an ImageOut from the API); `extra` is a line of context (rank, score);
 * `items` ([{image, extra}], the grid it was opened from) gives it previous and next.
 */
export async function openViewer(image, extra = "", items = []) {
  const dialog = $("viewer");
  const img = $("viewer-img");
  const mine = ++opened;
  release();
  sequence = items;
  position = items.findIndex((item) => item.image.id === image.id);
  $("viewer-nav").hidden = position < 0 || items.length < 2;
  $("viewer-prev").disabled = position <= 0;
  $("viewer-next").disabled = position < 0 || position >= items.length - 1;
  $("viewer-position").textContent = position < 0 ? "" : `${position + 1} of ${items.length}`;
  $("viewer-title").textContent = image.filename || "Photo";
  img.alt = image.filename || "Photo";
  const meta = `${image.width}×${image.height} · ${formatBytes(image.size_bytes)} · ${image.mime}`;
  $("viewer-meta").textContent = extra ? `${extra} · ${meta}` : meta;
  if (!dialog.open) dialog.showModal();
  try {
    const blob = await api.blob(image.file_url);
    if (!dialog.open || mine !== opened) return;
    current = URL.createObjectURL(blob);
    img.addEventListener(
      "load",
      () => img.classList.toggle("pixelated", img.naturalWidth < 256),
      { once: true },
    );
    img.src = current;
  } catch (error) {
    if (!isAbort(error)) $("viewer-meta").textContent = error.message;
  }
}
