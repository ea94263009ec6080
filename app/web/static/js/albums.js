// Concept albums (docs/ALBUMS.md): every photo of a concept in the library, with how sure the
// service is in words, and one click to say "not it" or "it is", with undo. Search hits that
// named a concept carry the same two actions. A mark teaches: the concept learns again from it.
// The album opens in a panel across the whole width of the Concepts view (#concept-album, one
// album at a time) with a responsive grid of thumbnails; ✕ or Escape closes it.

import { api, isAbort } from "./api.js";
import { $, busy, clear, el, plural, setAlert, toast } from "./dom.js";
import { Thumbs } from "./thumbs.js";

const thumbs = new Thumbs();
const PAGE = 24;
const REASONS = { taught: "taught from", confirmed: "you said it is", matched: "" };

/** An album photo's confidence in words (the CLI says the same: app/cli/http.py). */
export function confidenceWords(confidence, cutoff) {
  if (confidence === null || confidence === undefined) return "not scored yet";
  if (confidence >= 1) return "as sure as its own photos";
  if (confidence >= cutoff + (1 - cutoff) / 2) return "likely";
  if (confidence >= cutoff) return "possibly";
  return "unlikely by its look";
}

const capital = (text) => text.charAt(0).toUpperCase() + text.slice(1);

/**
 * "Not Fido" / "It is Fido" for one photo, and Undo once marked. `onChange(verdict)` hears the
 * photo's mark after each change (null after an undo).
 */
export function markControls(concept, image, initial = null, onChange = () => {}) {
  const name = image.filename || "this photo";
  const cid = encodeURIComponent(concept.id);
  const iid = encodeURIComponent(image.id);
  const no = el("button", {
    type: "button",
    className: "button small",
    text: `Not ${concept.name}`,
    attrs: { "aria-label": `${name} is not ${concept.name}` },
  });
  const yes = el("button", {
    type: "button",
    className: "button small",
    text: `It is ${concept.name}`,
    attrs: { "aria-label": `${name} is ${concept.name}` },
  });
  const undo = el("button", {
    type: "button",
    className: "button small ghost",
    text: "Undo",
    attrs: { "aria-label": `Undo the mark of ${name} for ${concept.name}` },
  });
  const status = el("span", { className: "small mark-status", attrs: { "aria-live": "polite" } });
  const error = el("span", { className: "alert small", attrs: { role: "alert" }, hidden: true });

  function show(verdict) {
    no.hidden = verdict === "rejected";
    yes.hidden = verdict === "confirmed";
    undo.hidden = !verdict;
    status.textContent =
      verdict === "rejected"
        ? `Marked: not ${concept.name}`
        : verdict === "confirmed"
          ? `Marked: ${concept.name}`
          : "";
  }

  async function send(verdict) {
    setAlert(error, "");
    await busy([no, yes, undo], async () => {
      try {
        const answer = verdict
          ? await api.put(`/concepts/${cid}/photos/${iid}/verdict`, { verdict })
          : await api.del(`/concepts/${cid}/photos/${iid}/verdict`);
        const now = answer.mark ? answer.mark.verdict : null;
        show(now);
        onChange(now);
        if (answer.job) toast(`${concept.name} learns from your mark.`);
      } catch (e) {
        if (!isAbort(e)) setAlert(error, e.message);
      }
    });
  }

  no.addEventListener("click", () => send("rejected"));
  yes.addEventListener("click", () => send("confirmed"));
  undo.addEventListener("click", () => send(null));
  show(initial);
  return el(
    "div",
    { className: "marks", attrs: { role: "group", "aria-label": `Is ${name} ${concept.name}?` } },
    no,
    yes,
    undo,
    status,
    error,
  );
}

function albumPhoto(concept, photo, cutoff) {
  const name = photo.image.filename || "untitled";
  const img = el("img", { alt: name, width: 160, height: 160, decoding: "async" });
  thumbs.attach(img, photo.image.thumbnail_url);
  const reason = REASONS[photo.reason] || "";
  const words = capital(confidenceWords(photo.confidence, cutoff));
  const item = el(
    "li",
    { className: "album-photo", dataset: { imageId: photo.image.id } },
    img,
    el("p", { className: "small confidence", text: reason ? `${words} · ${reason}` : words }),
  );
  item.append(
    markControls(concept, photo.image, photo.verdict, (verdict) => {
      item.classList.toggle("rejected", verdict === "rejected");
    }),
  );
  return item;
}

/** A concept's album, newest first, a page at a time. */
export function albumSection(concept) {
  const summary = el("p", { className: "muted small album-summary", text: "Looking…" });
  const list = el("ul", {
    className: "album-photos",
    attrs: { "aria-label": `Every photo of ${concept.name}` },
  });
  const more = el("button", {
    type: "button",
    className: "button small",
    text: "More photos",
    hidden: true,
  });
  const error = el("p", { className: "alert", attrs: { role: "alert" }, hidden: true });
  let cursor = null;

  async function load() {
    setAlert(error, "");
    try {
      const query = { limit: PAGE, ...(cursor ? { cursor } : {}) };
      const body = await api.get(`/concepts/${encodeURIComponent(concept.id)}/photos`, query);
      summary.textContent =
        body.total === 0
          ? `No photos of ${concept.name} in your library yet.`
          : `${plural(body.total, "photo")} of ${concept.name} in your library, newest first. ` +
            "Wrong one? Say so: it learns from it.";
      for (const warning of body.warnings || []) {
        summary.append(" ", warning);
      }
      for (const photo of body.items) list.append(albumPhoto(concept, photo, body.cutoff));
      cursor = body.next_cursor;
      more.hidden = !cursor;
    } catch (e) {
      if (!isAbort(e)) setAlert(error, e.message);
    }
  }

  more.addEventListener("click", () => busy(more, load));
  load();
  return el(
    "section",
    { className: "album", attrs: { "aria-label": `Album of ${concept.name}` } },
    summary,
    list,
    more,
    error,
  );
}

let shown = null; // { concept, opener } of the open album panel, null when closed
const listeners = new Set(); // hear the panel open and close: (concept id or null) => void

/** The id of the concept whose album is open, or null. */
export function openAlbumId() {
  return shown ? shown.concept.id : null;
}

/** `listener(conceptId | null)` after the panel opens or closes (cards keep aria-expanded). */
export function onAlbumChange(listener) {
  listeners.add(listener);
}

function announce() {
  for (const listener of listeners) listener(openAlbumId());
}

/** Close the album panel; focus goes back to the button that opened it (when still there). */
export function closeAlbum({ refocus = true } = {}) {
  if (!shown) return;
  const { opener } = shown;
  shown = null;
  thumbs.clear();
  const panel = $("concept-album");
  clear(panel);
  panel.hidden = true;
  announce();
  if (refocus && opener?.isConnected) opener.focus();
}

/** Open `concept`'s album in the full-width panel (replacing any other album shown there). */
export function openAlbum(concept, opener = null) {
  closeAlbum({ refocus: false });
  const panel = $("concept-album");
  const close = el("button", {
    type: "button",
    className: "button ghost album-close",
    text: "✕",
    attrs: { "aria-label": `Close the album of ${concept.name}`, title: "Close (Esc)" },
    on: { click: () => closeAlbum() },
  });
  const head = el(
    "div",
    { className: "album-head" },
    el("h2", { text: `Every photo of ${concept.name}` }),
    close,
  );
  panel.replaceChildren(head, albumSection(concept));
  panel.hidden = false;
  shown = { concept, opener };
  announce();
  // Its heading just below the sticky top bar (taller on a phone, where the nav wraps).
  const bar = document.querySelector(".topbar");
  const top = panel.getBoundingClientRect().top + window.scrollY;
  window.scrollTo({ top: Math.max(0, top - (bar ? bar.offsetHeight : 0) - 8) });
  close.focus({ preventScroll: true });
}

// Escape closes the album, unless a dialog (the photo viewer) is open above it and takes it.
document.addEventListener("keydown", (event) => {
  if (event.key !== "Escape" || !shown || event.defaultPrevented) return;
  if (document.querySelector("dialog[open]")) return;
  event.preventDefault();
  closeAlbum();
});
