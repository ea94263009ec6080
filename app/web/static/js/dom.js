// Small DOM helpers. Text always goes in through textContent: nothing from the API or the user
// is ever parsed as HTML.

/**
 * Create an element. `props`: className, text, attrs (object), on (events), dataset, and any
 * plain DOM property (type, disabled, value, ...). Children: nodes or strings (as text).
 */
export function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (value === undefined || value === null) continue;
    if (key === "className") node.className = value;
    else if (key === "text") node.textContent = String(value);
    else if (key === "attrs") {
      for (const [name, v] of Object.entries(value)) {
        if (v !== undefined && v !== null && v !== false) node.setAttribute(name, String(v));
      }
    } else if (key === "dataset") Object.assign(node.dataset, value);
    else if (key === "on") {
      for (const [event, handler] of Object.entries(value)) node.addEventListener(event, handler);
    } else node[key] = value;
  }
  append(node, ...children);
  return node;
}

/** Append nodes or strings (as text nodes), skipping null/false. */
export function append(parent, ...children) {
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    parent.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return parent;
}

export const $ = (id) => document.getElementById(id);

export function clear(node) {
  node.replaceChildren();
  return node;
}

/** Show a message in an alert element (or hide it when `message` is empty). */
export function setAlert(node, message) {
  node.textContent = message || "";
  node.hidden = !message;
}

/**
 * Per-file rejections of an upload as a list, each file once. `error`: the API's error (its
 * detail.files, positions from 0 within that request) or `{ files: [{position, filename,
 * message}] }` with positions from 1 in what the user chose.
 */
export function showRejections(list, error) {
  clear(list);
  const files = error?.files || error?.detail?.files;
  if (!Array.isArray(files) || files.length === 0) {
    list.hidden = true;
    return;
  }
  for (const f of files) {
    const position = f.position ?? Number(f.index) + 1;
    const name = f.filename || `file ${position}`;
    list.append(
      el(
        "li",
        {},
        el("strong", { text: name }),
        el("span", { className: "muted", text: ` (file ${position})` }),
        " — ",
        el("span", { text: f.message || f.code }),
      ),
    );
  }
  list.hidden = false;
}

/** "12.5 of 40.0 MB sent": a <progress> for bytes going up. */
export function byteProgress(label) {
  const bar = el("progress", { max: 1, value: 0 });
  const text = el("span", { className: "progress-text", text: `${label}…` });
  bar.setAttribute("aria-label", label);
  return {
    node: el("div", { className: "progress bytes" }, text, bar),
    update(sent, total) {
      bar.value = total ? sent / total : 0;
      text.textContent = `${label}: ${formatBytes(sent)} of ${formatBytes(total)} sent`;
    },
  };
}

/** A date for people: "4 Jul 2019". */
export function formatDate(iso) {
  const date = new Date(iso);
  if (Number.isNaN(date.getTime())) return "";
  return date.toLocaleDateString(undefined, { day: "numeric", month: "short", year: "numeric" });
}

/**
 * Run `fn` with the given controls disabled (and aria-busy), re-enabling them afterwards; focus
 * goes back to the control that had it, so keyboard users keep their place.
 */
export async function busy(controls, fn) {
  const list = [controls].flat().filter(Boolean);
  const focused = document.activeElement;
  for (const c of list) {
    c.disabled = true;
    c.setAttribute("aria-busy", "true");
  }
  try {
    return await fn();
  } finally {
    for (const c of list) {
      c.disabled = false;
      c.removeAttribute("aria-busy");
    }
    const lost = !document.activeElement || document.activeElement === document.body;
    if (lost && focused instanceof HTMLElement && focused.isConnected) focused.focus();
  }
}

export function plural(n, one, many = `${one}s`) {
  return `${n} ${n === 1 ? one : many}`;
}

export function formatBytes(n) {
  if (n < 1024) return `${n} B`;
  if (n < 1024 * 1024) return `${(n / 1024).toFixed(1)} KB`;
  return `${(n / 1024 / 1024).toFixed(1)} MB`;
}

/** A labelled <progress> for a job: "label: 40 %". */
export function jobProgress(label) {
  const bar = el("progress", { max: 1, value: 0 });
  const text = el("span", { className: "progress-text", text: `${label}: queued` });
  const box = el("div", { className: "progress" }, text, bar);
  bar.setAttribute("aria-label", label);
  return {
    node: box,
    update(job) {
      bar.value = job.progress;
      const pct = Math.round(job.progress * 100);
      text.textContent = `${label}: ${job.state === "running" ? `${pct} %` : job.state}`;
    },
    done(message) {
      bar.value = 1;
      text.textContent = message;
    },
  };
}

let toastTimer = 0;

/** A short, polite status message at the bottom of the screen. */
export function toast(message) {
  const node = $("toast");
  node.textContent = message;
  node.hidden = false;
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => {
    node.hidden = true;
  }, 4000);
}
