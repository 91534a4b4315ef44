// hotmodel dashboard: building DOM nodes and formatting values, with no state of their own.
"use strict";

window.hotmodelDom = (() => {
  // A DOM element; strings become text nodes (never HTML), so data cannot inject markup.
  function el(tag, props = {}, children = []) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(props)) {
      if (value === undefined || value === null || value === false) continue;
      if (key === "text") node.textContent = String(value);
      else if (key === "class") node.className = value;
      else if (key === "dataset") Object.assign(node.dataset, value);
      else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
      else node.setAttribute(key, value === true ? "" : String(value));
    }
    for (const child of children) if (child !== null && child !== undefined) node.append(child);
    return node;
  }

  function fmtBytes(n) {
    if (typeof n !== "number") return "–";
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
    return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
  }

  function fmtDuration(seconds) {
    const s = Math.floor(seconds);
    const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60);
    return h ? `${h}h ${m}m` : m ? `${m}m ${s % 60}s` : `${s}s`;
  }

  // hotmodel writes times as 2025-01-31T12:00:00+0000; Date wants +00:00.
  function fmtTime(text) {
    if (!text) return "–";
    const date = new Date(String(text).replace(/([+-]\d\d)(\d\d)$/, "$1:$2"));
    return Number.isNaN(date.getTime()) ? String(text) : date.toLocaleTimeString();
  }

  function messageText(content) {
    if (typeof content === "string") return content;
    if (Array.isArray(content)) return content.map((part) => part.text || `[${part.type}]`).join("");
    return content === null || content === undefined ? "" : JSON.stringify(content);
  }

  return { el, fmtBytes, fmtDuration, fmtTime, messageText };
})();
