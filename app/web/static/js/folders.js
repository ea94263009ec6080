// Library view, "Folders on the server": folders indexed in place (POST /libraries), each with
// its last scan's report, "Scan now" and "Remove". The photos stay where they are.

import { api, isAbort, waitForJob } from "./api.js";
import { $, busy, clear, el, formatDate, jobProgress, plural, setAlert, toast } from "./dom.js";

let onScanned = () => {};
let generation = 0;

/** Wire the form; `afterScan()` runs when a scan this page started has finished. */
export function setupFolders(afterScan) {
  onScanned = afterScan;
  $("folder-form").addEventListener("submit", (event) => {
    event.preventDefault();
    addFolder();
  });
}

export function resetFolders() {
  generation += 1;
  clear($("folder-list"));
  clear($("folder-progress"));
  setAlert($("folder-error"), "");
  $("folder-path").value = "";
}

/** List the user's folders and say where folders may be. */
export async function loadFolders() {
  const mine = ++generation;
  try {
    const listing = await api.get("/libraries");
    if (mine !== generation) return;
    const roots = listing.roots || [];
    $("folder-form").hidden = roots.length === 0;
    $("folders-hint").textContent = roots.length
      ? `Folders under ${roots.join(", ")} can be added. They are read in place, never ` +
        "copied or changed, and kept up to date as photos are added, changed or deleted."
      : "This server allows no folders (its admin sets POLAR_LIBRARY__ROOTS). Upload photos below.";
    const list = $("folder-list");
    clear(list);
    for (const library of listing.items) list.append(folderItem(library));
  } catch (error) {
    if (!isAbort(error) && mine === generation) setAlert($("folder-error"), error.message);
  }
}

async function addFolder() {
  const input = $("folder-path");
  const path = input.value.trim();
  if (!path) {
    setAlert($("folder-error"), "Type the folder's path on the server, e.g. /photos/2024.");
    input.focus();
    return;
  }
  await busy([$("folder-add"), input], async () => {
    try {
      const library = await api.post("/libraries", { json: { path } });
      setAlert($("folder-error"), "");
      input.value = "";
      await loadFolders();
      await follow(library.job, library.path);
    } catch (error) {
      if (!isAbort(error)) setAlert($("folder-error"), error.message);
    }
  });
}

async function scanNow(library, button) {
  await busy(button, async () => {
    try {
      const job = await api.post(`/libraries/${encodeURIComponent(library.id)}/scan`);
      setAlert($("folder-error"), "");
      await follow(job, library.path);
    } catch (error) {
      if (!isAbort(error)) setAlert($("folder-error"), error.message);
    }
  });
}

async function removeFolder(library, button) {
  const question =
    `Remove the folder ${library.path} from your library? Its photos leave the search ` +
    "index; the files on the server are not touched.";
  if (!window.confirm(question)) return;
  await busy(button, async () => {
    try {
      await api.del(`/libraries/${encodeURIComponent(library.id)}`);
      toast(`${library.path} removed; its files are untouched.`);
      await loadFolders();
      onScanned();
    } catch (error) {
      if (!isAbort(error)) setAlert($("folder-error"), error.message);
    }
  });
}

/** Show a scan's progress until it ends, then its report. */
async function follow(job, path) {
  if (!job) return;
  const progress = jobProgress(`Scanning ${path}`);
  $("folder-progress").append(progress.node);
  const done = await waitForJob(job.id, (j) => progress.update(j));
  progress.node.remove();
  if (done.state === "failed") {
    setAlert($("folder-error"), `Scanning ${path} failed: ${done.error?.message || "unknown error"}`);
  } else {
    toast(`${path} scanned.`);
  }
  await loadFolders();
  onScanned();
}

/** "120 added, 3 changed, 2 skipped" from a scan report (what changed, in plain words). */
export function describeReport(report) {
  if (!report) return "Not scanned yet.";
  const parts = [];
  for (const [key, word] of [
    ["added", "added"],
    ["changed", "changed"],
    ["moved", "moved"],
    ["removed", "removed"],
    ["unchanged", "unchanged"],
  ]) {
    if (report[key]) parts.push(`${plural(report[key], "photo")} ${word}`);
  }
  if (report.skipped_count) parts.push(`${plural(report.skipped_count, "file")} skipped`);
  if (report.failed_count) {
    parts.push(`${plural(report.failed_count, "photo")} not searchable (unreadable)`);
  }
  if (report.refused_count) {
    parts.push(`${plural(report.refused_count, "folder")} not read (another user's or the service's)`);
  }
  if (report.not_pruned) parts.push(`nothing removed: ${report.not_pruned}`);
  return parts.length ? `${parts.join(", ")}.` : "No photos found in this folder.";
}

function folderItem(library) {
  const report = library.report;
  const when = library.scanned_at ? `Last scanned ${formatDate(library.scanned_at)}: ` : "";
  const scan = el("button", {
    type: "button",
    className: "button small",
    text: "Scan now",
    attrs: { "aria-label": `Scan ${library.path} now` },
  });
  const remove = el("button", {
    type: "button",
    className: "button small danger",
    text: "Remove",
    attrs: { "aria-label": `Remove ${library.path}` },
  });
  scan.addEventListener("click", () => scanNow(library, scan));
  remove.addEventListener("click", () => removeFolder(library, remove));
  const item = el(
    "li",
    { className: "folder", dataset: { libraryId: library.id } },
    el("code", { className: "folder-path", text: library.path }),
    el("span", { className: "folder-report muted", text: when + describeReport(report) }),
    el("span", { className: "folder-actions" }, scan, remove),
  );
  if (library.watch_error) {
    item.append(
      el("span", { className: "folder-watch", text: `Not watched: ${library.watch_error}` }),
    );
  }
  const skipped = whyList(report?.skipped, report?.skipped_count, (n) =>
    `Why ${plural(n, "file was", "files were")} skipped`,
  );
  // Indexed, but their file could not be read or decoded when embedded: read again once changed.
  const failed = whyList(report?.failed, report?.failed_count, (n) =>
    `Why ${plural(n, "photo is", "photos are")} not searchable`,
  );
  for (const details of [skipped, failed]) if (details) item.append(details);
  return item;
}

/** A <details> listing {path, reason} entries (of `count` in all), or null when there are none. */
function whyList(entries, count, title) {
  if (!entries?.length) return null;
  const rows = entries.map((s) =>
    el("li", {}, el("code", { text: s.path }), document.createTextNode(`: ${s.reason}`)),
  );
  const more = count - entries.length;
  if (more > 0) rows.push(el("li", { className: "muted", text: `and ${more} more` }));
  return el(
    "details",
    { className: "folder-skipped" },
    el("summary", { text: title(count) }),
    el("ul", {}, ...rows),
  );
}
