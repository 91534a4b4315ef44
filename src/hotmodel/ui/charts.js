// hotmodel dashboard: the charts, drawn by hand as inline SVG (no library, nothing fetched).
// Pure functions of the data they are given; app.js decides when to draw.
"use strict";

window.hotmodelCharts = (() => {
  const NS = "http://www.w3.org/2000/svg";

  // Every step a command can take, in the order they run (rollback last).
  const PHASES = [
    "restart", "check", "drain", "save", "unload", "settle",
    "load", "restore", "activate", "replay", "rollback",
  ];
  const COLORS = {
    restart: "#b07aa1", check: "#9aa5b1", drain: "#f28e2b", save: "#9c755f",
    unload: "#e15759", settle: "#bab0ac", load: "#4e79a7", restore: "#76b7b2",
    activate: "#edc948", replay: "#59a14f", rollback: "#ff9da7",
  };
  const GPU_POINTS = ["before_unload", "after_unload", "after_settle", "after_load"];
  const GPU_COLORS = ["#e15759", "#f28e2b", "#bab0ac", "#4e79a7"];

  function svg(tag, attrs = {}, children = []) {
    const node = document.createElementNS(NS, tag);
    for (const [key, value] of Object.entries(attrs)) {
      if (value !== undefined && value !== null) node.setAttribute(key, String(value));
    }
    for (const child of children) node.append(child);
    return node;
  }

  function title(text) {
    return svg("title", {}, [text]);
  }

  function fmtMs(ms) {
    if (typeof ms !== "number") return "–";
    return ms >= 1000 ? `${(ms / 1000).toFixed(2)} s` : `${ms.toFixed(1)} ms`;
  }

  function swatch(color) {
    return svg("svg", { width: 10, height: 10, viewBox: "0 0 10 10" }, [
      svg("rect", { width: 10, height: 10, rx: 2, fill: color }),
    ]);
  }

  // The phases' colour key, for the history table.
  function legend() {
    return PHASES.filter((p) => p !== "activate").map((phase) => {
      const item = document.createElement("span");
      item.append(swatch(COLORS[phase]), phase);
      return item;
    });
  }

  // One report's phases as a horizontal bar; `scale` is the longest total shown, so that
  // bars of different switches compare. With `starts` (ms from the command's start) each
  // phase is drawn where it ran, and one that ran beside another (a CPU-only switch saves
  // and unloads the leaving model while the next one loads) goes in a thin lane below;
  // without them (older reports) the phases are stacked one after another.
  function phaseBar(phases, scale, starts) {
    const width = 400;
    const bar = svg("svg", {
      class: "phase-bar", viewBox: `0 0 ${width} 16`, preserveAspectRatio: "none",
      role: "img", "aria-label": "phase timings",
    });
    const px = (ms) => (scale > 0 ? (ms / scale) * width : 0);
    const timed = starts && PHASES.every((p) => typeof phases[p] !== "number"
      || typeof starts[p] === "number");
    const order = PHASES.filter((p) => typeof phases[p] === "number");
    if (timed) order.sort((a, b) => starts[a] - starts[b]);
    let x = 0;
    let mainEnd = 0; // where the main lane's last phase ended (ms)
    for (const phase of order) {
      const ms = phases[phase];
      const at = timed ? starts[phase] : null;
      const beside = timed && at < mainEnd - 0.5;
      if (timed && !beside) mainEnd = at + ms;
      const left = timed ? px(at) : x;
      const w = px(ms);
      bar.append(svg("rect", {
        x: left.toFixed(2), y: beside ? 11 : 1,
        width: Math.max(w, ms > 0 ? 1 : 0).toFixed(2), height: beside ? 4 : 14,
        fill: COLORS[phase] || "#888", "data-phase": phase,
        "data-lane": beside ? "beside" : "main",
      }, [title(`${phase}: ${fmtMs(ms)}${beside ? " (alongside another phase)" : ""}`)]));
      x += w;
    }
    return bar;
  }

  // GPU memory (MiB, all devices) at the four points of each switch, as grouped bars.
  // Returns null when no report carries a snapshot (no GPU visible).
  function gpuChart(reports) {
    const rows = reports.filter((r) => GPU_POINTS.some((p) => r.gpu && r.gpu[p]));
    if (!rows.length) return null;
    const shown = rows.slice(-12);
    const max = Math.max(1, ...shown.flatMap(
      (r) => GPU_POINTS.map((p) => (r.gpu[p] ? r.gpu[p].used_mib : 0)),
    ));
    const left = 48, top = 8, height = 150, group = 44, bar = 9;
    const width = left + shown.length * group + 8;
    const chart = svg("svg", {
      class: "chart", viewBox: `0 0 ${width} ${top + height + 34}`, role: "img",
      "aria-label": "GPU memory per switch",
    });
    for (const frac of [0, 0.5, 1]) {
      const y = top + height - frac * height;
      chart.append(
        svg("line", { x1: left, x2: width, y1: y, y2: y, stroke: "#dde1e6" }),
        svg("text", { x: left - 4, y: y + 4, "text-anchor": "end" }, [`${Math.round(max * frac)}`]),
      );
    }
    chart.append(svg("text", { x: 2, y: top + height + 30 }, ["MiB"]));
    shown.forEach((report, i) => {
      const x0 = left + i * group + 4;
      GPU_POINTS.forEach((point, j) => {
        const snap = report.gpu[point];
        if (!snap) return;
        const h = (snap.used_mib / max) * height;
        chart.append(svg("rect", {
          class: "gpu-bar", x: x0 + j * bar, y: (top + height - h).toFixed(1), width: bar - 1,
          height: h.toFixed(1), fill: GPU_COLORS[j],
        }, [title(`#${report.id} ${point}: ${snap.used_mib} MiB`)]));
      });
      chart.append(svg("text", { x: x0, y: top + height + 14 }, [`#${report.id}`]));
    });
    return chart;
  }

  function gpuLegend() {
    return GPU_POINTS.map((point, j) => {
      const item = document.createElement("span");
      item.append(swatch(GPU_COLORS[j]), point.replace("_", " "));
      return item;
    });
  }

  // A used/limit meter (the KV snapshot store against its byte budget).
  function meter(used, limit) {
    const frac = limit > 0 ? Math.min(1, used / limit) : 0;
    return svg("svg", {
      class: "phase-bar", viewBox: "0 0 400 16", preserveAspectRatio: "none", role: "img",
      "aria-label": "store use",
    }, [
      svg("rect", { x: 0, y: 1, width: 400, height: 14, fill: "#edf2f7" }),
      svg("rect", {
        x: 0, y: 1, width: (400 * frac).toFixed(2), height: 14,
        fill: frac > 0.9 ? "#e15759" : "#4e79a7",
      }),
    ]);
  }

  return { PHASES, COLORS, fmtMs, legend, phaseBar, gpuChart, gpuLegend, meter };
})();
