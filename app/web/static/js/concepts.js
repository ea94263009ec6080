// Concepts view: teach a concept from photos (uploaded, or picked in the library), watch it
// train, see in words how it does and the photos it learned from; rename it, change its
// category, give it more photos, delete it.

import { closeAlbum, onAlbumChange, openAlbum, openAlbumId } from "./albums.js";
import { api, isAbort, waitForJob } from "./api.js";
import {
  $,
  busy,
  clear,
  el,
  jobProgress,
  plural,
  setAlert,
  showRejections,
  toast,
} from "./dom.js";
import { dropTarget } from "./library.js";
import { searchFor } from "./search.js";
import { pickFor } from "./selection.js";
import { Thumbs } from "./thumbs.js";

const MIN_PHOTOS = 3;
const MAX_PHOTOS = 13;

let photos = []; // File objects chosen for the new concept
let picks = []; // library images (ImageOut) chosen for the new concept
let previewUrls = [];
const thumbs = new Thumbs(); // library picks' previews and the concepts' photos
let cursor = null;
let generation = 0; // bumped by every reload: pages of an older listing are dropped
const watching = new Set(); // concept ids whose training job is being polled

export function setupConcepts() {
  const input = $("concept-files");
  input.addEventListener("change", () => choosePhotos([...input.files]));
  dropTarget($("concept-drop"), (files) => choosePhotos(files));
  $("concept-form").addEventListener("submit", (event) => {
    event.preventDefault();
    create();
  });
  $("concepts-refresh").addEventListener("click", () => loadConcepts());
  $("concepts-more").addEventListener("click", () => loadPage());
  // Each card's "Every photo" says whether its album is the one open.
  onAlbumChange((open) => {
    for (const button of $("concepts-list").querySelectorAll("button[data-album-of]")) {
      button.setAttribute("aria-expanded", String(button.dataset.albumOf === open));
    }
  });
}

export function resetConcepts() {
  picks = [];
  thumbs.clear();
  choosePhotos([]);
  $("concept-form").reset();
  clear($("concept-progress"));
  clear($("concepts-list"));
  setAlert($("concept-error"), "");
  setAlert($("concepts-error"), "");
  showRejections($("concept-rejections"), null);
  cursor = null;
  generation += 1;
  watching.clear();
  closeAlbum({ refocus: false });
}

/** Teach a new concept from library images (a selection's "Teach a new concept"). */
export function teachFromLibrary(images) {
  window.location.hash = "#concepts";
  picks = images;
  choosePhotos(photos);
  $("concept-name").focus();
  toast(`${plural(images.length, "photo")} from your library chosen: name the concept.`);
}

function choosePhotos(files) {
  for (const url of previewUrls) URL.revokeObjectURL(url);
  previewUrls = [];
  photos = files;
  const list = clear($("concept-previews"));
  for (const file of files) {
    const url = URL.createObjectURL(file);
    previewUrls.push(url);
    list.append(el("li", {}, el("img", { src: url, alt: file.name })));
  }
  for (const image of picks) {
    const img = el("img", { alt: image.filename || "library photo", width: 56, height: 56 });
    list.append(el("li", { className: "library-pick" }, img));
    thumbs.load(img, image.thumbnail_url);
  }
  const n = files.length + picks.length;
  if (n) {
    const ok = n >= MIN_PHOTOS && n <= MAX_PHOTOS;
    const from = picks.length ? ` (${picks.length} from your library)` : "";
    list.append(
      el("li", {
        className: ok ? "count muted small" : "count warn small",
        text: `${plural(n, "photo")}${from}${ok ? "" : ` — ${MIN_PHOTOS}–${MAX_PHOTOS} needed`}`,
      }),
    );
  }
}

async function create() {
  const name = $("concept-name").value.trim();
  const category = $("concept-category").value.trim();
  setAlert($("concept-error"), "");
  showRejections($("concept-rejections"), null);
  if (!name) {
    setAlert($("concept-error"), "Give the concept a name: it is the word your searches use.");
    $("concept-name").focus();
    return;
  }
  if (!photos.length && !picks.length) {
    setAlert($("concept-error"), `Choose ${MIN_PHOTOS} to ${MAX_PHOTOS} photos of it.`);
    $("concept-files").focus();
    return;
  }
  // The API checks the photo count (and everything else) and says what is wrong.
  const form = new FormData();
  form.append("name", name);
  if (category) form.append("category", category);
  for (const file of photos) form.append("files", file, file.name);
  for (const image of picks) form.append("image_ids", image.id);
  const progressBox = clear($("concept-progress"));
  const controls = [$("concept-submit"), $("concept-files")];
  await busy(controls, async () => {
    let created;
    try {
      created = await api.post("/concepts", { form });
    } catch (error) {
      if (isAbort(error)) return;
      setAlert($("concept-error"), error.message);
      showRejections($("concept-rejections"), error);
      return;
    }
    $("concept-form").reset();
    picks = [];
    choosePhotos([]);
    const concept = created.concept;
    const progress = jobProgress(`Training ${concept.name}`);
    progressBox.append(progress.node);
    watching.add(concept.id); // polled here, not by the list
    await loadConcepts();
    try {
      const job = await waitForJob(created.job.id, (j) => progress.update(j));
      const fresh = await api.get(`/concepts/${encodeURIComponent(concept.id)}`);
      replaceCard(fresh, job);
      if (job.state === "failed") {
        progress.done(`Training ${concept.name} failed.`);
        setAlert($("concept-error"), job.error?.message || "training failed");
      } else {
        progress.done(`${fresh.name} is ready: search for “${fresh.name}” now.`);
        toast(`${fresh.name} is ready.`);
      }
    } catch (error) {
      if (!isAbort(error)) setAlert($("concept-error"), error.message);
    } finally {
      watching.delete(concept.id);
    }
  });
}

/** Reload the list from the first page. */
export async function loadConcepts() {
  generation += 1;
  cursor = null;
  thumbs.clear();
  choosePhotos(photos); // the thumbnails of library picks were just released
  clear($("concepts-list"));
  await loadPage();
}

async function loadPage() {
  const mine = generation;
  await busy([$("concepts-more"), $("concepts-refresh")], async () => {
    try {
      const page = await api.get("/concepts", { limit: 50, cursor });
      if (mine !== generation) return;
      for (const concept of page.items) {
        $("concepts-list").append(card(concept));
        if (concept.state === "training") watch(concept);
      }
      cursor = page.next_cursor;
      setAlert($("concepts-error"), "");
      if (!$("concepts-list").children.length) {
        $("concepts-list").append(
          el("li", { className: "empty muted", text: "No concepts yet: teach one above." }),
        );
      }
    } catch (error) {
      if (!isAbort(error) && mine === generation) setAlert($("concepts-error"), error.message);
    }
  });
  if (mine !== generation) return;
  $("concepts-more").hidden = !cursor;
}

function replaceCard(concept, job) {
  const old = $("concepts-list").querySelector(`li[data-concept-id="${CSS.escape(concept.id)}"]`);
  const fresh = card(concept, job);
  $("concepts-list").querySelector("li.empty")?.remove();
  if (old) old.replaceWith(fresh);
  else $("concepts-list").append(fresh);
}

/** Poll a concept that is training (e.g. started in another tab) and refresh its card. */
async function watch(concept) {
  if (!concept.job_id || watching.has(concept.id)) return;
  watching.add(concept.id);
  try {
    const job = await waitForJob(concept.job_id, () => {}, 800);
    replaceCard(await api.get(`/concepts/${encodeURIComponent(concept.id)}`), job);
  } catch (error) {
    if (!isAbort(error)) setAlert($("concepts-error"), error.message);
  } finally {
    watching.delete(concept.id);
  }
}

/** Whether the concept can be searched for, in words. */
function stateWords(concept) {
  return { ready: "Ready", training: "Learning…", failed: "Failed" }[concept.state] || concept.state;
}

/** How the concept does, in words: what the numbers mean, not the numbers. */
function qualityWords(concept) {
  const lines = [];
  const seconds = concept.metrics?.train_seconds;
  if (concept.state === "ready") {
    const took = typeof seconds === "number" ? ` in ${seconds.toFixed(1)} s` : "";
    lines.push(`Learned${took} from ${plural(concept.example_count, "photo")}. Use its name in a search.`);
  } else if (concept.state === "training") {
    lines.push(`Learning from ${plural(concept.example_count, "photo")}; this takes a few seconds.`);
  }
  if (concept.retention_score !== null && !concept.retention_flagged) {
    lines.push("Searches that do not name it are unaffected.");
  }
  const separation = separationWords(concept.metrics?.separation);
  if (separation) lines.push(separation);
  return lines;
}

/**
 * How its own photos ranked against the rest of the library when it was trained. A photo that
 * ranks as high may be one of it that was not taught, or a look-alike: never claimed which.
 */
export function separationWords(sep) {
  if (!sep || typeof sep.checked !== "number") return null;
  if (sep.checked === 0) return "Your library had no other photos to compare it with yet.";
  const others = plural(sep.checked, "other library photo");
  if (sep.lookalikes === 0) {
    return (
      `Its searches rank the photos it was taught from above all ${others} checked ` +
      "(other photos of it included)."
    );
  }
  const verb = sep.lookalikes === 1 ? "ranks" : "rank";
  return (
    `${sep.lookalikes} of the ${others} checked ${verb} as high as the photos it was taught ` +
    "from, so its searches find them too: photos of it, or look-alikes. If they are not it, " +
    "more photos of it from other sides help."
  );
}

function card(concept, job = null) {
  const stateClass = { ready: "good", failed: "bad", training: "info" }[concept.state] || "";
  const about = concept.category
    ? `A ${concept.category} of yours · version ${concept.version}`
    : `No category · version ${concept.version}`;
  const item = el(
    "li",
    { className: "concept panel", dataset: { conceptId: concept.id, state: concept.state } },
    el(
      "div",
      { className: "concept-head" },
      el("h3", { text: concept.name }),
      el("span", { className: `badge ${stateClass} state`, text: stateWords(concept) }),
    ),
    el("p", { className: "muted small about", text: about }),
  );
  for (const line of qualityWords(concept)) {
    item.append(el("p", { className: "concept-words", text: line }));
  }
  if (concept.retention_flagged) {
    item.append(
      el("p", {
        className: "notice flagged",
        attrs: { role: "note" },
        text:
          "Searches that name it may find fewer of the other things they ask for: it changed " +
          "the model more than it should. Photos that show it from more sides, or a different " +
          "category, may help.",
      }),
    );
  }
  if (concept.state === "failed") {
    const why = job?.error?.message || concept.metrics?.error?.message;
    item.append(el("p", { className: "alert", text: why ? `Learning failed: ${why}` : "Learning failed." }));
  }
  const photoList = el("ul", {
    className: "concept-photos",
    attrs: { "aria-label": `Photos of ${concept.name}` },
  });
  item.append(photoList);
  loadPhotos(concept, photoList);

  const error = el("p", { className: "alert", attrs: { role: "alert" }, hidden: true });
  const actions = el("div", { className: "row" });
  if (concept.state === "ready") {
    actions.append(
      el("button", {
        type: "button",
        className: "button small",
        text: "Search",
        attrs: { "aria-label": `Search for ${concept.name}` },
        on: {
          click: () => {
            window.location.hash = "#search";
            searchFor(concept.name);
          },
        },
      }),
    );
  }
  const albumButton = el("button", {
    type: "button",
    className: "button small",
    text: "Every photo",
    attrs: {
      "aria-label": `Every photo of ${concept.name}`,
      "aria-controls": "concept-album",
      "aria-expanded": String(openAlbumId() === concept.id),
    },
    dataset: { albumOf: concept.id },
  });
  albumButton.addEventListener("click", () => {
    if (openAlbumId() === concept.id) closeAlbum();
    else openAlbum(concept, albumButton);
  });
  actions.append(albumButton);
  const editButton = el("button", {
    type: "button",
    className: "button small",
    text: "Rename or change category",
    attrs: { "aria-label": `Edit ${concept.name}`, "aria-expanded": "false" },
  });
  const addInput = el("input", {
    type: "file",
    multiple: true,
    accept: "image/*",
    className: "visually-hidden",
    attrs: { "aria-label": `Add photos of ${concept.name}` },
  });
  const addButton = el("button", {
    type: "button",
    className: "button small",
    text: "Add photos",
    on: { click: () => addInput.click() },
  });
  addInput.addEventListener("change", () => {
    const files = [...addInput.files];
    addInput.value = "";
    if (files.length) addPhotos(concept, files, item, error, addButton);
  });
  const pick = el("button", {
    type: "button",
    className: "button small",
    text: "Pick from library",
    attrs: { "aria-label": `Pick photos of ${concept.name} from the library` },
    on: {
      click: () => {
        pickFor(concept);
        window.location.hash = "#library";
      },
    },
  });
  const remove = el("button", {
    type: "button",
    className: "button small danger",
    text: "Delete",
    attrs: { "aria-label": `Delete concept ${concept.name}` },
  });
  remove.addEventListener("click", () => removeConcept(concept, item, remove, error));
  actions.append(editButton, addButton, addInput, pick, remove);
  item.append(actions);
  const editor = editForm(concept, item, error);
  editor.hidden = true;
  editButton.addEventListener("click", () => {
    editor.hidden = !editor.hidden;
    editButton.setAttribute("aria-expanded", String(!editor.hidden));
    if (!editor.hidden) editor.querySelector("input").focus();
  });
  item.append(editor, error);
  return item;
}

async function loadPhotos(concept, list) {
  try {
    const answer = await api.get(`/concepts/${encodeURIComponent(concept.id)}/examples`);
    for (const [i, photo] of answer.items.entries()) {
      const img = el("img", {
        alt: `${concept.name}, photo ${i + 1}`,
        width: 56,
        height: 56,
        decoding: "async",
      });
      list.append(el("li", {}, img));
      thumbs.attach(img, photo.thumbnail_url);
    }
  } catch (error) {
    if (!isAbort(error)) list.append(el("li", { className: "muted small", text: error.message }));
  }
}

function editForm(concept, item, error) {
  const nameId = `edit-name-${concept.id}`;
  const categoryId = `edit-category-${concept.id}`;
  const name = el("input", { id: nameId, type: "text", value: concept.name, maxLength: 64 });
  const category = el("input", {
    id: categoryId,
    type: "text",
    value: concept.category || "",
    maxLength: 40,
  });
  const save = el("button", { type: "submit", className: "button primary small", text: "Save" });
  const form = el(
    "form",
    { className: "concept-edit", attrs: { "aria-label": `Edit ${concept.name}` } },
    el("div", { className: "field" }, el("label", { htmlFor: nameId, text: "Name" }), name),
    el(
      "div",
      { className: "field" },
      el("label", { htmlFor: categoryId, text: "Category (changing it retrains)" }),
      category,
    ),
    save,
  );
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const body = {};
    if (name.value.trim() !== concept.name) body.name = name.value.trim();
    const newCategory = category.value.trim() || null;
    if (newCategory !== (concept.category || null)) body.category = newCategory;
    if (!Object.keys(body).length) {
      form.hidden = true;
      return;
    }
    setAlert(error, "");
    await busy(save, async () => {
      try {
        const answer = await api.patch(`/concepts/${encodeURIComponent(concept.id)}`, body);
        const fresh = answer.concept;
        replaceCard(fresh);
        toast(
          answer.job
            ? `${fresh.name} is learning its new category.`
            : `Renamed to ${fresh.name}.`,
        );
        if (answer.job) watch(fresh);
      } catch (e) {
        if (!isAbort(e)) setAlert(error, e.message);
      }
    });
  });
  return form;
}

async function addPhotos(concept, files, item, error, button) {
  setAlert(error, "");
  const form = new FormData();
  for (const file of files) form.append("files", file, file.name);
  const status = el("p", { className: "muted small", text: "Sending photos…" });
  item.append(status);
  await busy(button, async () => {
    try {
      const answer = await api.upload(
        `/concepts/${encodeURIComponent(concept.id)}/examples`,
        form,
        (sent, total) => {
          status.textContent = `Sending photos: ${Math.round((100 * sent) / Math.max(1, total))} %`;
        },
      );
      replaceCard(answer.concept);
      toast(`${concept.name} learns from ${plural(files.length, "more photo")}.`);
      watch(answer.concept);
    } catch (e) {
      status.remove();
      if (isAbort(e)) return;
      const files = e.detail?.files;
      // All or nothing: name the bad files once, with their position among those chosen.
      const names = Array.isArray(files)
        ? ` (${files.map((f) => `${f.filename || `file ${f.index + 1}`}: ${f.message}`).join("; ")})`
        : "";
      setAlert(error, Array.isArray(files) ? `Nothing was added${names}.` : e.message);
    }
  });
}

async function removeConcept(concept, item, button, error) {
  const question =
    `Delete the concept “${concept.name}”? Searches stop knowing it. Your library keeps ` +
    "every photo; only the copies uploaded just to teach it go.";
  if (!window.confirm(question)) return;
  await busy(button, async () => {
    try {
      await api.del(`/concepts/${encodeURIComponent(concept.id)}`);
      item.remove();
      if (openAlbumId() === concept.id) closeAlbum({ refocus: false });
      toast(`Deleted ${concept.name}.`);
      $("concepts-refresh").focus();
    } catch (e) {
      if (!isAbort(e)) setAlert(error, e.message);
    }
  });
}
