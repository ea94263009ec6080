// Concepts view: teach a concept from photos (training progress, then its quality), list, delete.

import { api, isAbort, waitForJob } from "./api.js";
import { $, busy, clear, el, jobProgress, plural, setAlert, showRejections, toast } from "./dom.js";
import { dropTarget } from "./library.js";
import { searchFor } from "./search.js";

const MIN_PHOTOS = 3;
const MAX_PHOTOS = 13;

let photos = []; // File objects chosen for the new concept
let previewUrls = [];
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
}

export function resetConcepts() {
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
  if (files.length) {
    const ok = files.length >= MIN_PHOTOS && files.length <= MAX_PHOTOS;
    list.append(
      el("li", {
        className: ok ? "count muted small" : "count warn small",
        text: `${plural(files.length, "photo")}${ok ? "" : ` (${MIN_PHOTOS}–${MAX_PHOTOS} needed)`}`,
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
  if (!photos.length) {
    setAlert($("concept-error"), `Choose ${MIN_PHOTOS} to ${MAX_PHOTOS} photos of it.`);
    $("concept-files").focus();
    return;
  }
  // The API checks the photo count (and everything else) and says what is wrong.
  const form = new FormData();
  form.append("name", name);
  if (category) form.append("category", category);
  for (const file of photos) form.append("files", file, file.name);
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
        progress.done(`${fresh.name} is ${fresh.state}: search for “${fresh.name}” now.`);
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

function fmt(value, digits = 3) {
  return typeof value === "number" ? value.toFixed(digits) : "–";
}

function card(concept, job = null) {
  const stateClass = { ready: "good", failed: "bad", training: "info" }[concept.state] || "";
  const m = concept.metrics || {};
  const facts = el("dl", { className: "meta" });
  const row = (term, value) => facts.append(el("dt", { text: term }), el("dd", { text: value }));
  row("Category", concept.category || "none");
  row("Version", String(concept.version));
  row("Photos", String(concept.example_count));
  row("Encodes as", concept.placeholder);
  if (concept.metrics) {
    row("Training", `${fmt(m.train_seconds, 2)} s, ${m.steps ?? "–"} steps, loss ${fmt(m.final_loss, 4)}`);
  }
  row("Retention", concept.retention_score === null ? "–" : fmt(concept.retention_score));

  const item = el(
    "li",
    { className: "concept panel", dataset: { conceptId: concept.id, state: concept.state } },
    el(
      "div",
      { className: "concept-head" },
      el("h3", { text: concept.name }),
      el("span", { className: `badge ${stateClass} state`, text: concept.state }),
    ),
    facts,
  );
  if (concept.retention_flagged) {
    item.append(
      el("p", {
        className: "notice flagged",
        attrs: { role: "note" },
        text:
          "Retention flagged: this concept's update costs general search quality beyond the " +
          "configured limit (retention " +
          `${fmt(concept.retention_score)}). Try other photos or a different category.`,
      }),
    );
  }
  if (concept.state === "failed" && job?.error) {
    item.append(el("p", { className: "alert", text: job.error.message }));
  }
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
  const remove = el("button", {
    type: "button",
    className: "button small danger",
    text: "Delete",
    attrs: { "aria-label": `Delete concept ${concept.name}` },
  });
  remove.addEventListener("click", () => removeConcept(concept, item, remove));
  actions.append(remove);
  item.append(actions);
  return item;
}

async function removeConcept(concept, item, button) {
  if (!window.confirm(`Delete the concept “${concept.name}” with its photos?`)) return;
  await busy(button, async () => {
    try {
      await api.del(`/concepts/${encodeURIComponent(concept.id)}`);
      item.remove();
      toast(`Deleted ${concept.name}.`);
      $("concepts-refresh").focus();
    } catch (error) {
      if (!isAbort(error)) setAlert($("concepts-error"), error.message);
    }
  });
}
