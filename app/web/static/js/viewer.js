// A modal dialog with one image at full size (the original, fetched with the key).

import { api, isAbort } from "./api.js";
import { $, formatBytes } from "./dom.js";

let current = null; // blob: URL shown now
let opened = 0; // which openViewer call the dialog shows

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
}

/** Show an image (an ImageOut from the API); `extra` is a line of context (rank, score). */
export async function openViewer(image, extra = "") {
  const dialog = $("viewer");
  const img = $("viewer-img");
  const mine = ++opened;
  release();
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
