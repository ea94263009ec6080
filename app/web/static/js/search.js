// Search view: a query, how the service understood it, and a page of ranked thumbnails.

import { markControls } from "./albums.js";
import { api, isAbort } from "./api.js";
import { $, clear, el, formatDate, plural, setAlert } from "./dom.js";
import { selectBox } from "./selection.js";
import { Thumbs } from "./thumbs.js";
import { openViewer } from "./viewer.js";

const thumbs = new Thumbs();
const state = { q: "", k: 24, offset: 0, personalize: true, last: null };
let latest = 0; // the newest search: answers to older ones (out of order) are dropped

export function setupSearch() {
  $("search-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const q = $("search-q").value.trim();
    if (!q) {
      setAlert($("search-error"), "Type what you are looking for.");
      $("search-q").focus();
      return;
    }
    state.q = q;
    state.offset = 0;
    run();
  });
  $("search-personalize").addEventListener("change", () => {
    if (state.q) {
      state.offset = 0;
      run();
    }
  });
  for (const id of ["search-from", "search-to", "search-type"]) {
    $(id).addEventListener("change", () => {
      if (state.q) {
        state.offset = 0;
        run();
      }
    });
  }
  $("search-k").addEventListener("change", () => {
    if (state.q) {
      state.offset = 0;
      run();
    }
  });
  $("search-clear-filters").addEventListener("click", () => {
    $("search-from").value = "";
    $("search-to").value = "";
    $("search-type").value = "";
    state.offset = 0;
    run();
    $("search-q").focus();
  });
  $("search-prev").addEventListener("click", () => {
    state.offset = Math.max(0, state.offset - state.k);
    run();
  });
  $("search-next").addEventListener("click", () => {
    state.offset += state.k;
    run();
  });
}

/** Search for `q` from elsewhere (a concept's "Search" button). */
export function searchFor(q) {
  $("search-q").value = q;
  state.q = q;
  state.offset = 0;
  run();
}

/** The date filter in words ("taken from 1 Jan 2001 to 31 Dec 2001"), or "" when unset. */
function datesInWords() {
  const day = (value) => formatDate(`${value}T00:00:00`);
  const from = $("search-from").value;
  const to = $("search-to").value;
  if (from && to) return `taken from ${day(from)} to ${day(to)}`;
  if (from) return `taken on or after ${day(from)}`;
  if (to) return `taken on or before ${day(to)}`;
  return "";
}

/**
 * A page with no results while filters are set: say which filter leaves nothing and what to
 * change. Each filter is tried alone (one small search each) so the words name the right one.
 */
async function explainEmpty(filters, mine) {
  const dates = {};
  if (filters.taken_after) dates.taken_after = filters.taken_after;
  if (filters.taken_before) dates.taken_before = filters.taken_before;
  const groups = [];
  if (Object.keys(dates).length) {
    groups.push({
      filters: dates,
      words: `No photo was ${datesInWords()} (the “Taken from” and “to” dates)`,
      change: "widen or clear the dates",
    });
  }
  if (filters.mime) {
    const type = $("search-type").selectedOptions[0]?.textContent || filters.mime[0];
    groups.push({
      filters: { mime: filters.mime },
      words: `No photo is a ${type} (the “Type” filter)`,
      change: "choose another type, or “any”",
    });
  }
  const empty = [];
  for (const group of groups) {
    try {
      const probe = await api.post("/search", {
        json: { q: state.q, k: 1, personalize: state.personalize, filters: group.filters },
      });
      if (mine !== latest) return;
      if (probe.hits.length === 0) empty.push(group);
    } catch (error) {
      if (isAbort(error)) return;
    }
  }
  if (mine !== latest) return;
  let why;
  if (empty.length) {
    why = empty.map((g) => `${g.words}: ${g.change}.`).join(" ");
  } else {
    // Each filter alone leaves photos; together they leave none.
    why =
      `No photo is ${groups.map((g) => g.words.replace(/^No photo (is|was) /, "")).join(" and ")}` +
      " at once: loosen one of the filters.";
  }
  $("search-empty-why").textContent = why;
  $("search-empty").hidden = false;
}

/** The date and type filters as the API's `filters`, or null when none is set. */
function currentFilters() {
  const filters = {};
  const from = $("search-from").value; // "2019-07-04": the local day's start, sent as UTC
  const to = $("search-to").value;
  if (from) filters.taken_after = new Date(`${from}T00:00:00`).toISOString();
  if (to) {
    const end = new Date(`${to}T00:00:00`);
    end.setDate(end.getDate() + 1); // "to" includes that whole day
    filters.taken_before = end.toISOString();
  }
  const type = $("search-type").value;
  if (type) filters.mime = [type];
  return Object.keys(filters).length ? filters : null;
}

// A word that looks like a name: a capital letter, then letters, digits or an apostrophe.
const NAME_LIKE = /(?<![\p{L}\p{N}])\p{Lu}[\p{L}\p{N}]+/gu;

/** Say so when the query seems to name something no concept is called (it ran as plain CLIP). */
function showHint(body) {
  let hint = "";
  if (state.personalize && body.concepts.length === 0) {
    const names = [...new Set(body.query.match(NAME_LIKE) || [])];
    if (names.length) {
      const quoted = names.map((n) => `“${n}”`).join(", ");
      hint =
        `${quoted} ${names.length === 1 ? "is not one of your concepts" : "are not your concepts"}` +
        ", so this was a plain search. Teach it under Concepts (from 3 photos) to find yours.";
    }
  }
  setAlert($("search-hint"), hint);
}

/** The getting-started guide, while nothing has been searched yet. */
export async function showGuide() {
  if (state.last) return;
  $("search-guide").hidden = false;
  try {
    const [index, concepts] = await Promise.all([
      api.get("/index"),
      api.get("/concepts", { limit: 200 }),
    ]);
    const n = concepts.items.length;
    $("guide-status").textContent =
      `You have ${plural(index.images, "photo")} (${index.embedded} searchable) and ` +
      `${n}${concepts.next_cursor ? "+" : ""} ${n === 1 ? "concept" : "concepts"}.`;
  } catch (error) {
    if (!isAbort(error)) $("guide-status").textContent = "";
  }
}

export function resetSearch() {
  latest += 1;
  thumbs.clear();
  state.q = "";
  state.offset = 0;
  state.last = null;
  $("search-q").value = "";
  clear($("search-summary"));
  clear($("search-results"));
  $("search-pager").hidden = true;
  setAlert($("search-error"), "");
  setAlert($("search-hint"), "");
  $("search-guide").hidden = true;
  $("search-empty").hidden = true;
  $("search-from").value = "";
  $("search-to").value = "";
  $("search-type").value = "";
}

/** Disable the search's buttons while a search runs (not busy(): runs can overlap). */
function setRunning(running) {
  const controls = [
    $("search-form").querySelector("button[type=submit]"),
    $("search-prev"),
    $("search-next"),
  ];
  for (const control of controls) {
    control.disabled = running;
    if (running) control.setAttribute("aria-busy", "true");
    else control.removeAttribute("aria-busy");
  }
  if (running) $("search-results").setAttribute("aria-busy", "true");
  else $("search-results").removeAttribute("aria-busy");
}

async function run() {
  const mine = ++latest;
  state.k = Number($("search-k").value);
  state.personalize = $("search-personalize").checked;
  const focused = document.activeElement;
  setAlert($("search-error"), "");
  setRunning(true);
  try {
    const filters = currentFilters();
    const body = filters
      ? await api.post("/search", {
          json: {
            q: state.q,
            k: state.k,
            offset: state.offset,
            personalize: state.personalize,
            filters,
          },
        })
      : await api.get("/search", {
          q: state.q,
          k: state.k,
          offset: state.offset,
          personalize: state.personalize,
        });
    if (mine !== latest) return;
    state.last = body;
    $("search-guide").hidden = true;
    $("search-empty").hidden = true;
    render(body);
    showHint(body);
    if (filters && body.hits.length === 0 && body.offset === 0) explainEmpty(filters, mine);
  } catch (error) {
    if (isAbort(error) || mine !== latest) return;
    // The old results answered another query: leave none on screen under the error.
    state.last = null;
    thumbs.clear();
    clear($("search-summary"));
    clear($("search-results"));
    $("search-empty").hidden = true;
    setAlert($("search-hint"), "");
    setAlert($("search-error"), error.message);
  }
  if (mine !== latest) return; // a newer search owns the controls now
  setRunning(false);
  updatePager();
  // Keep the keyboard user's place (a button that is now disabled cannot keep focus).
  const lost = document.activeElement === document.body;
  if (lost && focused instanceof HTMLElement && !focused.disabled) focused.focus();
}

function render(body) {
  renderSummary(body);
  thumbs.clear();
  const grid = clear($("search-results"));
  const extra = (hit) => `#${hit.rank} · score ${hit.score.toFixed(3)}`;
  const items = body.hits.map((hit) => ({ image: hit.image, extra: extra(hit) }));
  // The concepts the query named: each hit can be marked as one of them, or not.
  const named = body.concepts.filter((c) => c.mentioned && c.applied);
  for (const hit of body.hits) {
    const name = hit.image.filename || "untitled";
    const img = el("img", { alt: name, width: 160, height: 160, decoding: "async" });
    const scoreTitle = body.reranked
      ? "cosine similarity plus the weighted region match (re-ranked)"
      : "cosine similarity of the query and the image";
    const open = el(
      "button",
      {
        type: "button",
        className: "thumb",
        attrs: { "aria-label": `Open result ${hit.rank}: ${name}` },
        on: { click: () => openViewer(hit.image, extra(hit), items) },
      },
      img,
    );
    grid.append(
      el(
        "li",
        { className: "card hit", dataset: { imageId: hit.image.id } },
        open,
        el(
          "div",
          { className: "card-meta" },
          el("span", { className: "rank", text: `#${hit.rank}` }),
          el("span", {
            className: "score",
            text: hit.score.toFixed(3),
            attrs: { title: scoreTitle },
          }),
        ),
        el("div", { className: "name", text: name, attrs: { title: name } }),
        el("div", { className: "card-actions" }, selectBox(hit.image, name)),
        ...named.map((concept) => markControls(concept, hit.image)),
      ),
    );
    thumbs.attach(img, hit.image.thumbnail_url);
  }
}

function renderSummary(body) {
  const box = clear($("search-summary"));
  const first = body.hits.length ? body.offset + 1 : 0;
  const last = body.offset + body.hits.length;
  const headline = el(
    "p",
    { className: "headline" },
    body.hits.length
      ? `Results ${first}–${last} for `
      : body.offset > 0
        ? "No more results for "
        : "No results for ",
    el("q", { text: body.query }),
    ` among ${plural(body.indexed, "searchable image")}`,
  );
  box.append(headline);

  const facts = el("div", { className: "facts" });
  facts.append(
    el("span", {
      className: body.personalized ? "badge good" : "badge",
      text: body.personalized ? "Personalized" : "Plain CLIP",
    }),
  );
  if (body.reranked) {
    facts.append(
      el("span", {
        className: "badge info",
        text: "Re-ranked by regions",
        attrs: { title: "several concepts: the top hits were re-ranked by where each matches" },
      }),
    );
  }
  for (const concept of body.concepts) {
    const how = concept.applied ? "applied" : "not applied";
    const version = concept.version ? ` v${concept.version}` : "";
    facts.append(
      el(
        "span",
        {
          className: concept.applied ? "chip applied" : "chip",
          dataset: { concept: concept.name },
          attrs: { title: concept.mentioned ? "named in the query" : "applied by id" },
        },
        el("strong", { text: concept.name }),
        `${version} · ${how}`,
      ),
    );
  }
  box.append(facts);

  // How the service read the query, for the curious: the rewritten text holds the concepts'
  // placeholder words, which mean nothing to most people.
  const details = el("dl", { className: "meta" });
  const row = (term, value, className) =>
    details.append(el("dt", { text: term }), el("dd", { text: value, className }));
  row("Encoded as", body.rewritten, "rewritten");
  row("Model", body.model, "model");
  box.append(el("details", { className: "tech" }, el("summary", { text: "How it was searched" }), details));

  if (body.pending > 0) {
    const verb = body.pending === 1 ? "is" : "are";
    box.append(
      el("p", {
        className: "notice pending",
        text: `${plural(body.pending, "image")} ${verb} still being embedded and not searchable yet.`,
      }),
    );
  }
  if (body.warnings.length) {
    const list = el("ul", { className: "warnings", attrs: { "aria-label": "Warnings" } });
    for (const warning of body.warnings) list.append(el("li", { text: warning }));
    box.append(list);
  }
}

function updatePager() {
  const body = state.last;
  const pager = $("search-pager");
  if (!body || (body.offset === 0 && body.hits.length < body.k)) {
    pager.hidden = true;
    return;
  }
  pager.hidden = false;
  $("search-prev").disabled = body.offset === 0;
  $("search-next").disabled = body.hits.length < body.k || body.offset + body.k >= body.indexed;
  const page = Math.floor(body.offset / body.k) + 1;
  const pages = Math.max(1, Math.ceil(body.indexed / body.k));
  $("search-range").textContent = `Page ${page} of ${pages}`;
}
