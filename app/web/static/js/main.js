// Entry point: sign-in, sign-out, and the four views behind #search, #library, #concepts, #index.

import { getKey, isAbort, onUnauthorized, serving, signIn, signOut } from "./api.js";
import { $, busy, setAlert, toast } from "./dom.js";
import { loadConcepts, resetConcepts, setupConcepts, teachFromLibrary } from "./concepts.js";
import { loadFolders, resetFolders, setupFolders } from "./folders.js";
import { loadLibrary, resetLibrary, setupLibrary } from "./library.js";
import { resetSearch, setupSearch, showGuide } from "./search.js";
import { resetSelection, setupSelection } from "./selection.js";
import { loadStatus, resetStatus, setupStatus } from "./status.js";
import { setupViewer } from "./viewer.js";

const VIEWS = {
  search: { load: showGuide, focus: "search-q" },
  library: { load: () => Promise.all([loadFolders(), loadLibrary()]), focus: "library-title" },
  concepts: { load: loadConcepts, focus: "concepts-title" },
  index: { load: loadStatus, focus: "index-title" },
};

function currentView() {
  const name = window.location.hash.replace(/^#/, "");
  return Object.hasOwn(VIEWS, name) ? name : "search";
}

function showOnly(id) {
  for (const section of document.querySelectorAll("main > .view")) {
    section.hidden = section.id !== id;
  }
}

function route({ focus = true } = {}) {
  if (!getKey()) {
    showSignIn();
    return;
  }
  $("nav").hidden = false;
  $("signout").hidden = false;
  $("toast").hidden = true; // it spoke of the view being left
  const name = currentView();
  showOnly(`view-${name}`);
  for (const link of $("nav").querySelectorAll("a")) {
    if (link.dataset.view === name) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  document.title = `${name[0].toUpperCase()}${name.slice(1)} · POLAR search`;
  const view = VIEWS[name];
  if (focus) $(view.focus)?.focus();
  view.load?.();
  checkModel();
}

let modelChecked = false;
// Dismissed until the next sign-in: the flag goes with the key (signIn/signOut clear it).
const BANNER_DISMISSED = "polar.demoBannerDismissed";

/** One line, on every view, while the synthetic demo model serves (unless dismissed). */
async function checkModel() {
  if (modelChecked) return;
  modelChecked = true;
  try {
    const ready = await serving();
    const banner = $("demo-banner");
    banner.hidden = !ready.demo_model || localStorage.getItem(BANNER_DISMISSED) === "1";
    // Why it serves (the configured weights failed), for whoever hovers: no paths in it.
    if (ready.warning) $("demo-banner-text").title = ready.warning;
  } catch {
    modelChecked = false; // try again on the next view
  }
}

function dismissBanner() {
  localStorage.setItem(BANNER_DISMISSED, "1");
  $("demo-banner").hidden = true;
  $("main").focus();
}

function showSignIn(message = "") {
  $("nav").hidden = true;
  $("signout").hidden = true;
  showOnly("view-signin");
  document.title = "Sign in · POLAR search";
  setAlert($("signin-error"), message);
  $("signin-key").focus();
}

function resetViews() {
  resetSelection();
  resetSearch();
  resetLibrary();
  resetFolders();
  resetConcepts();
  resetStatus();
}

function setupSignIn() {
  const form = $("signin-form");
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const key = $("signin-key").value.trim();
    if (!key) {
      setAlert($("signin-error"), "Enter your API key.");
      return;
    }
    await busy(form.querySelector("button[type=submit]"), async () => {
      try {
        await signIn(key);
        localStorage.removeItem(BANNER_DISMISSED); // a new sign-in shows the note again
        modelChecked = false;
        $("signin-key").value = "";
        setAlert($("signin-error"), "");
        route();
      } catch (error) {
        if (!isAbort(error)) setAlert($("signin-error"), error.message);
      }
    });
  });
  $("demo-banner-close").addEventListener("click", () => dismissBanner());
  $("signout").addEventListener("click", () => {
    signOut();
    localStorage.removeItem(BANNER_DISMISSED);
    $("demo-banner").hidden = true;
    modelChecked = false;
    resetViews();
    showSignIn();
    toast("Signed out. The key was removed from this browser.");
  });
  // The key stopped working (revoked, or another one was signed in elsewhere): start over.
  onUnauthorized((error) => {
    signOut();
    $("demo-banner").hidden = true;
    modelChecked = false;
    resetViews();
    showSignIn(`Signed out: ${error.message}`);
  });
}

function start() {
  setupViewer();
  setupSignIn();
  setupSearch();
  setupLibrary();
  setupFolders(() => loadLibrary());
  setupConcepts();
  setupStatus();
  setupSelection({
    onTeach: (images) => teachFromLibrary(images),
    onAdded: () => {
      window.location.hash = "#concepts";
      loadConcepts();
    },
  });
  window.addEventListener("hashchange", () => route());
  route({ focus: false });
  document.body.dataset.ready = "true";
}

start();
