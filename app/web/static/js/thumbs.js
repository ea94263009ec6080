// Images behind the API key: fetched with the Bearer header and shown through blob: URLs.
// A Thumbs instance owns the URLs it made and revokes them when their image is replaced,
// released, or the whole grid is cleared. Thumbnails load when they scroll into view, a few at
// a time.

import { api, isAbort } from "./api.js";

const CONCURRENCY = 6;

export class Thumbs {
  constructor() {
    this.urls = new Map(); // img -> blob: URL
    this.queue = [];
    this.active = 0;
    this.generation = 0;
    // Images whose card is gone. Not "!img.isConnected": an image is often made, handed here
    // and only then put on the page (it must still load when it gets there).
    this.released = new WeakSet();
    this.observer = new IntersectionObserver((entries) => this.#visible(entries), {
      rootMargin: "200px",
    });
  }

  /** Load `path` (an API path such as image.thumbnail_url) into `img` once it is near view. */
  attach(img, path) {
    this.released.delete(img);
    img.dataset.path = path;
    img.classList.add("loading");
    this.observer.observe(img);
  }

  /** Load now, whether visible or not (the viewer's full-size image). */
  load(img, path) {
    this.released.delete(img);
    img.dataset.path = path;
    img.classList.add("loading");
    this.#enqueue(img);
  }

  /** Forget one image (its card is gone): revoke its URL. */
  release(img) {
    this.released.add(img);
    this.observer.unobserve(img);
    this.#revoke(img);
  }

  /** Forget everything (the grid is being replaced): revoke every URL, drop queued loads. */
  clear() {
    this.generation += 1;
    this.queue = [];
    this.observer.disconnect();
    for (const url of this.urls.values()) URL.revokeObjectURL(url);
    this.urls.clear();
  }

  #visible(entries) {
    for (const entry of entries) {
      if (!entry.isIntersecting) continue;
      this.observer.unobserve(entry.target);
      this.#enqueue(entry.target);
    }
  }

  #enqueue(img) {
    this.queue.push({ img, generation: this.generation });
    this.#pump();
  }

  #pump() {
    while (this.active < CONCURRENCY && this.queue.length) {
      const { img, generation } = this.queue.shift();
      if (generation !== this.generation || this.released.has(img)) continue;
      this.active += 1;
      this.#fetch(img, generation).finally(() => {
        this.active -= 1;
        this.#pump();
      });
    }
  }

  async #fetch(img, generation) {
    try {
      const blob = await api.blob(img.dataset.path);
      if (generation !== this.generation || this.released.has(img)) return;
      this.#revoke(img);
      const url = URL.createObjectURL(blob);
      this.urls.set(img, url);
      img.addEventListener(
        "load",
        () => {
          img.classList.remove("loading");
          // Small pictures (the demo model's 64 px scenes) stay crisp when scaled up.
          if (img.naturalWidth < 160) img.classList.add("pixelated");
        },
        { once: true },
      );
      img.src = url;
    } catch (error) {
      if (isAbort(error)) return;
      img.classList.remove("loading");
      img.classList.add("broken");
      img.title = error.message;
    }
  }

  #revoke(img) {
    const old = this.urls.get(img);
    if (old) {
      URL.revokeObjectURL(old);
      this.urls.delete(img);
    }
  }
}
