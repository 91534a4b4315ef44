// hotmodel dashboard: talking to hotmodel. Every call carries the admin key when one was
// given (kept in this tab's sessionStorage); server-sent events are read from a fetch()
// response, because EventSource cannot send the Authorization header /admin/* needs.
"use strict";

window.hotmodelNet = (() => {
  const KEY_STORAGE = "hotmodel.adminKey";

  // A 401 or 403: the page needs (another) admin key. `message` is hotmodel's reason.
  class Unauthorized extends Error {}

  function adminKey() {
    return sessionStorage.getItem(KEY_STORAGE) || "";
  }

  function setKey(key) {
    sessionStorage.setItem(KEY_STORAGE, key);
  }

  function forgetKey() {
    sessionStorage.removeItem(KEY_STORAGE);
  }

  async function errorMessage(resp) {
    try {
      const body = await resp.json();
      return (body.error && body.error.message) || `HTTP ${resp.status}`;
    } catch {
      return `HTTP ${resp.status}`;
    }
  }

  async function request(path, options = {}) {
    const headers = { ...(options.headers || {}) };
    if (adminKey()) headers.authorization = `Bearer ${adminKey()}`;
    const resp = await fetch(path, { ...options, headers, cache: "no-store" });
    if (resp.status === 401 || resp.status === 403) throw new Unauthorized(await errorMessage(resp));
    return resp;
  }

  // Server-sent events of a fetch() response, as {event, data} (data parsed by `parse`:
  // JSON, which throws on anything else); a comment (the keep-alive) comes as
  // {event: "keepalive"}.
  async function* readEvents(resp, parse = JSON.parse) {
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) return;
        buffer += decoder.decode(value, { stream: true });
        let cut;
        while ((cut = buffer.indexOf("\n\n")) >= 0) {
          const parsed = parseBlock(buffer.slice(0, cut), parse);
          buffer = buffer.slice(cut + 2);
          if (parsed) yield parsed;
        }
      }
    } finally {
      reader.cancel().catch(() => {});
    }
  }

  function parseBlock(block, parse) {
    let event = "message", comment = false;
    const data = [];
    for (const line of block.split("\n")) {
      if (line.startsWith(":")) { comment = true; continue; }
      const colon = line.indexOf(":");
      const field = colon < 0 ? line : line.slice(0, colon);
      const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
      if (field === "event") event = value;
      else if (field === "data") data.push(value);
    }
    if (data.length) return { event, data: parse(data.join("\n")) };
    return comment ? { event: "keepalive", data: null } : null;
  }

  return { Unauthorized, adminKey, setKey, forgetKey, errorMessage, request, readEvents };
})();
