// Photos selected in the library or in search results, and what can be done with them: teach a
// new concept from them, or add them to a concept ("This is Fido"). The files are the library's:
// the API reuses them (image_ids), nothing is uploaded again.

import { api, isAbort } from "./api.js";
import { $, busy, clear, el, plural, setAlert, toast } from "./dom.js";

const selected = new Map(); // image id -> ImageOut
const listeners = new Set();
let concepts = []; // ready-or-not concepts for "This is …", refreshed when a selection starts
let teachHandler = () => {};
let addedHandler = () => {};
let preferred = null; // concept id to preselect ("Pick from library" on a concept card)

export function setupSelection({ onTeach, onAdded }) {
  teachHandler = onTeach;
  addedHandler = onAdded;
  $("selection-clear").addEventListener("click", () => clearSelection());
  $("selection-teach").addEventListener("click", () => {
    const images = [...selected.values()];
    clearSelection();
    teachHandler(images);
  });
  $("selection-concept").addEventListener("change", () => labelAdd());
  $("selection-add").addEventListener("click", () => addToConcept());
}

export function onSelectionChange(listener) {
  listeners.add(listener);
}

export const isSelected = (id) => selected.has(id);

/** A "Select" checkbox for a card showing `image`. */
export function selectBox(image, name) {
  const box = el("input", {
    type: "checkbox",
    checked: selected.has(image.id),
    attrs: { "aria-label": `Select ${name}` },
    dataset: { imageId: image.id },
  });
  box.addEventListener("change", () => toggle(image, box.checked));
  return el("label", { className: "pick" }, box, "Select");
}

/** Open the bar for adding photos to `concept` (a concept card's "Pick from library"). */
export function pickFor(concept) {
  preferred = concept.id;
  toast(`Select photos of ${concept.name}, then choose “This is ${concept.name}”.`);
}

export function toggle(image, on) {
  const had = selected.size;
  if (on) selected.set(image.id, image);
  else selected.delete(image.id);
  render();
  if (!had && selected.size) refreshConcepts();
}

export function clearSelection() {
  selected.clear();
  setAlert($("selection-error"), "");
  render();
}

export function resetSelection() {
  preferred = null;
  concepts = [];
  clearSelection();
}

function render() {
  const bar = $("selection");
  bar.hidden = selected.size === 0;
  $("selection-count").textContent = `${plural(selected.size, "photo")} selected`;
  for (const box of document.querySelectorAll("input[type=checkbox][data-image-id]")) {
    box.checked = selected.has(box.dataset.imageId);
  }
  for (const listener of listeners) listener(selected);
}

async function refreshConcepts() {
  try {
    const items = [];
    let cursor = null;
    do {
      const page = await api.get("/concepts", { limit: 200, cursor });
      items.push(...page.items);
      cursor = page.next_cursor;
    } while (cursor);
    concepts = items;
  } catch (error) {
    if (!isAbort(error)) setAlert($("selection-error"), error.message);
    return;
  }
  const select = $("selection-concept");
  const chosen = preferred || select.value; // keep what the user (or a card) chose
  clear(select);
  for (const concept of concepts) {
    select.append(el("option", { value: concept.id, text: concept.name }));
  }
  if (chosen && concepts.some((c) => c.id === chosen)) select.value = chosen;
  $("selection-add").closest(".selection-add").hidden = concepts.length === 0;
  labelAdd();
}

function labelAdd() {
  const concept = concepts.find((c) => c.id === $("selection-concept").value);
  $("selection-add").textContent = concept ? `This is ${concept.name}` : "This is …";
}

async function addToConcept() {
  const concept = concepts.find((c) => c.id === $("selection-concept").value);
  if (!concept) return;
  setAlert($("selection-error"), "");
  const form = new FormData();
  for (const id of selected.keys()) form.append("image_ids", id);
  await busy([$("selection-add"), $("selection-teach")], async () => {
    try {
      const answer = await api.post(`/concepts/${encodeURIComponent(concept.id)}/examples`, {
        form,
      });
      const count = selected.size;
      clearSelection();
      preferred = null;
      toast(`${concept.name} learns from ${plural(count, "more photo")}.`);
      addedHandler(answer);
    } catch (error) {
      if (!isAbort(error)) setAlert($("selection-error"), error.message);
    }
  });
}
