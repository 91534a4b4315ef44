// hotmodel dashboard: reads hotmodel's admin API and its live feed, and draws the page.
//
// Live updates come from GET /admin/events (server-sent events, read by net.js). The
// admin key, when one is needed, is asked for once and kept in this tab. Nothing is
// polled: the feed says when something changed; sessions and the router log are re-read
// after each switch and with the feed's keep-alive (every 15 s), or with their buttons.
"use strict";

(() => {
  const charts = window.hotmodelCharts;
  const net = window.hotmodelNet;
  const playground = window.hotmodelPlayground;
  const { el, fmtBytes, fmtDuration, fmtTime, messageText } = window.hotmodelDom;
  const LOG_LINES = 200;

  const state = {
    status: null, // the last GET /admin/status body (or feed `status` event)
    statusAt: 0, // when it came (performance.now()), for the uptime clock
    models: new Map(), // id -> {id, status, active}
    history: new Map(), // report id -> report
    progress: null, // {id, from, to, phases: Map(name -> event), report}
    switching: false, // a switch started here is running
    sessions: [],
    selected: null, // the session id shown
    feedRunning: false,
    tryAbort: null, // the AbortController of the playground's request in flight
    tokens: new Map(), // model -> the token ids its last /tokenize gave (for /detokenize)
    trySent: 0, // requests the playground sent (on the page as data-sent, for tests)
  };

  const $ = (id) => document.getElementById(id);

  // ---- the API: a 401/403 asks for the admin key ----

  async function api(path, options = {}) {
    try {
      return await net.request(path, options);
    } catch (err) {
      if (err instanceof net.Unauthorized) askForKey(err.message);
      throw err;
    }
  }

  async function getJson(path) {
    const resp = await api(path);
    if (!resp.ok) throw new Error(await net.errorMessage(resp));
    return resp.json();
  }

  // ---- the admin key ----

  function askForKey(message) {
    document.body.classList.add("locked");
    $("key-prompt").hidden = false;
    $("key-error").textContent = net.adminKey() ? message : "";
    $("key-input").focus();
  }

  function useKey(event) {
    event.preventDefault();
    net.setKey($("key-input").value.trim());
    $("key-input").value = "";
    document.body.classList.remove("locked");
    $("key-prompt").hidden = true;
    start();
  }

  // ---- rendering ----

  function renderStatus() {
    const s = state.status;
    if (!s) return;
    $("version").textContent = `v${s.version}`;
    setBadge($("health"), s.health);
    $("active-model").textContent = s.active_model || "none";
    $("switch-state").textContent = s.switch.state;
    const r = s.router;
    $("router").textContent = `${r.state}, pid ${r.pid ?? "–"}, port ${r.port}` +
      (r.restarts ? `, ${r.restarts} restart(s)` : "");
    $("gpu-probe").textContent = s.gpu_probe;
    $("forget-key").hidden = !net.adminKey();
    renderUptime();
    renderKv();
    renderModels();
  }

  function renderUptime() {
    if (!state.status) return;
    const seconds = state.status.uptime_seconds + (performance.now() - state.statusAt) / 1000;
    $("uptime").textContent = fmtDuration(seconds);
  }

  function setBadge(node, word) {
    node.textContent = word;
    node.className = `badge ${word}`;
  }

  function busy() {
    return state.switching || (state.status !== null && state.status.switch.state !== "idle" &&
      state.status.switch.state !== "failed");
  }

  function renderModels() {
    const active = state.status ? state.status.active_model : null;
    const names = state.status ? state.status.presets : [...state.models.keys()];
    const rows = names.map((name) => {
      const model = state.models.get(name) || { id: name, status: "unknown" };
      const isActive = name === active;
      // a resident stays loaded beside the active model: it is never switched to
      const resident = state.status && state.status.residents ? state.status.residents[name] : undefined;
      return el("tr", { dataset: { model: name, status: model.status }, class: isActive ? "active" : "" }, [
        el("td", { class: "mono", text: name }),
        el("td", {}, [el("span", { class: `badge ${model.status}`, text: model.status })]),
        el("td", {}, [
          isActive ? el("span", { class: "badge active", text: "active" }) : null,
          resident !== undefined ? el("span", { class: "badge resident", text: `resident: ${resident}` }) : null,
          queued(name),
        ]),
        el("td", {}, [resident !== undefined ? null : el("button", {
          type: "button", text: "Switch", "aria-label": `Switch to ${name}`,
          disabled: isActive || busy(), onclick: () => switchTo(name),
        })]),
      ]);
    });
    $("models").tBodies[0].replaceChildren(...rows);
  }

  // The scheduler's queue for a model (requests waiting for it to be loaded), if any.
  function queued(name) {
    const queue = state.status && state.status.queues ? state.status.queues[name] : null;
    if (!queue) return null;
    return el("span", {
      class: "badge loading",
      text: `${queue.waiting} waiting, oldest ${queue.oldest_wait_s.toFixed(1)} s`,
    });
  }

  function startProgress(id, from, to) {
    state.progress = { id, from, to, phases: new Map(), report: null };
  }

  function onPhase(event) {
    if (state.progress && state.progress.id === null) {
      state.progress.id = event.switch_id; // the switch this page just asked for
    } else if (!state.progress || state.progress.id !== event.switch_id) {
      const current = state.status && state.status.switch.current;
      const same = current && current.id === event.switch_id;
      startProgress(event.switch_id, same ? current.from : null, same ? current.to : null);
    }
    state.progress.phases.set(event.phase, event);
    renderProgress();
  }

  function onReport(report) {
    state.history.set(report.id, report);
    if (!state.progress || state.progress.id === report.id) {
      if (!state.progress) startProgress(report.id, report.from, report.to);
      Object.assign(state.progress, { from: report.from, to: report.to, report });
    }
    renderProgress();
    renderHistory();
  }

  function renderProgress() {
    const p = state.progress;
    if (!p) return;
    $("progress-title").textContent = `#${p.id ?? "…"} ${p.from ?? "none"} → ${p.to ?? "none"}`;
    const icons = { started: "▶", done: "✓", failed: "✗", skipped: "–" };
    $("phases").replaceChildren(...[...p.phases.values()].map((e) => el(
      "li", { class: `status-${e.status}`, dataset: { phase: e.phase } }, [
        el("span", { class: "icon", text: icons[e.status] || "?" }),
        el("span", { class: "mono", text: e.phase }),
        el("span", { class: "num", text: e.status === "done" || e.ms ? charts.fmtMs(e.ms) : e.status }),
        el("span", { class: "detail", text: e.detail || "", title: e.detail || "" }),
      ],
    )));
    const message = $("switch-message");
    const r = p.report;
    message.className = r && r.outcome === "failed" ? "failed" : "";
    message.textContent = !r ? "running…"
      : r.outcome === "failed" ? `failed: ${r.error}` + (r.rolled_back ? " (rolled back)" : "")
        : r.outcome === "already_active" ? `${r.to} is already active`
          : `active: ${r.active_after} after ${charts.fmtMs(r.total_ms)} (${r.policy})`;
  }

  function renderHistory() {
    const reports = [...state.history.values()].sort((a, b) => b.id - a.id);
    const scale = Math.max(0, ...reports.map((r) => Math.max(
      r.total_ms || 0, r.phase_starts ? 0 : Object.values(r.phases || {}).reduce((a, b) => a + b, 0),
    )));
    $("history").tBodies[0].replaceChildren(...reports.map((r) => el("tr", {
      dataset: { id: r.id, to: r.to ?? "", outcome: r.outcome },
      class: r.outcome === "failed" ? "failed" : "",
      title: [r.error, ...(r.warnings || [])].filter(Boolean).join("\n") || null,
    }, [
      el("td", { class: "num", text: r.id }),
      el("td", { text: fmtTime(r.started_at) }),
      el("td", { class: "mono", text: `${r.from ?? "none"} → ${r.to ?? "none"}` }),
      el("td", {}, [el("span", { class: `badge ${r.outcome}`, text: r.outcome })]),
      el("td", { class: "num", text: charts.fmtMs(r.total_ms) }),
      el("td", {}, [charts.phaseBar(r.phases || {}, scale, r.phase_starts)]),
    ])));
    renderGpu();
  }

  function renderGpu() {
    const reports = [...state.history.values()].sort((a, b) => a.id - b.id);
    const chart = charts.gpuChart(reports);
    const box = $("gpu-chart");
    if (chart) {
      box.replaceChildren(el("div", { class: "legend" }, charts.gpuLegend()), chart);
    } else {
      const probe = state.status ? state.status.gpu_probe : "…";
      box.replaceChildren(el("p", {
        class: "muted",
        text: `No GPU visible (probe: ${probe}): the switch reports carry no GPU memory readings.`,
      }));
    }
  }

  function renderKv() {
    const kv = state.status && state.status.kv_snapshots;
    if (!kv) {
      $("kv").replaceChildren(el("p", { class: "muted", text: "Off ([switch] kv_snapshots = false)." }));
      return;
    }
    $("kv").replaceChildren(
      el("div", { class: "kv-bar" }, [charts.meter(kv.bytes, kv.max_bytes)]),
      el("dl", { class: "facts" }, [
        el("dt", { text: "snapshots" }), el("dd", { text: kv.count }),
        el("dt", { text: "size" }), el("dd", { text: `${fmtBytes(kv.bytes)} of ${fmtBytes(kv.max_bytes)}` }),
        el("dt", { text: "folder" }), el("dd", { class: "mono", text: kv.folder }),
      ]),
    );
  }

  function renderSessions() {
    const rows = state.sessions.map((s) => el("tr", {
      dataset: { session: s.id }, class: s.id === state.selected ? "selected" : "",
      onclick: () => showSession(s.id),
    }, [
      el("td", { class: "mono", text: s.id }),
      el("td", { class: "num", text: s.messages }),
      el("td", { text: s.system_prompt || "–" }),
      el("td", { text: new Date(s.updated_at * 1000).toLocaleString() }),
    ]));
    if (!rows.length) rows.push(el("tr", {}, [el("td", { colspan: 4, class: "muted", text: "No sessions yet." })]));
    $("sessions").tBodies[0].replaceChildren(...rows);
  }

  // ---- loading ----

  async function loadModels() {
    const body = await getJson("/v1/models");
    state.models = new Map(body.data.map((m) => [m.id, m]));
    renderModels();
    renderPlayground();
  }

  async function loadHistory() {
    const body = await getJson("/admin/switches");
    state.history = new Map(body.data.map((r) => [r.id, r]));
    renderHistory();
    if (!state.progress && body.data.length) showReport(body.data[0]); // the newest
  }

  // The Switch panel for a switch this page did not watch: its report's phases, in the
  // order they started (phase_starts), each with its duration; the failed one marked.
  function showReport(report) {
    startProgress(report.id, report.from, report.to);
    const starts = report.phase_starts || {};
    const names = Object.keys(report.phases || {}).sort((a, b) => (starts[a] ?? 0) - (starts[b] ?? 0));
    for (const phase of names) {
      state.progress.phases.set(phase, { switch_id: report.id, phase, status: "done", ms: report.phases[phase], detail: null });
    }
    if (report.failed_phase) {
      state.progress.phases.set(report.failed_phase, {
        switch_id: report.id, phase: report.failed_phase, status: "failed", ms: null, detail: report.error,
      });
    }
    state.progress.report = report;
    renderProgress();
  }

  async function loadSessions() {
    const body = await getJson("/v1/sessions");
    state.sessions = body.data;
    renderSessions();
  }

  // ---- the cluster (GET /admin/cluster): shown only when this node is in one ----

  async function loadCluster() {
    const body = await getJson("/admin/cluster");
    $("cluster-card").hidden = !body.enabled;
    if (!body.enabled) return;
    $("cluster-self").textContent = `this node: ${body.self}`;
    $("cluster-error").textContent = body.error ? `registry: ${body.error}` : "";
    const sum = (counts) => Object.values(counts || {}).reduce((a, b) => a + b, 0);
    const rows = body.nodes.map((n) => el("tr", { class: n.alive ? "" : "muted", "data-node": n.id }, [
      el("td", { class: "mono", text: n.self ? `${n.id} (this)` : n.id }),
      el("td", { class: "mono", text: n.url }),
      el("td", { text: n.alive ? "alive" : "out" }),
      el("td", { text: (n.loaded || []).join(", ") || "-" }),
      el("td", { text: String(sum(n.in_flight)) }),
      el("td", { text: String(sum(n.queued)) }),
      el("td", { text: `${n.heartbeat_age_seconds.toFixed(1)} s ago` }),
    ]));
    $("cluster").querySelector("tbody").replaceChildren(...rows);
  }

  async function loadLogs() {
    const body = await getJson(`/admin/logs?lines=${LOG_LINES}`);
    $("log-file").textContent = body.file;
    const pre = $("logs");
    const atBottom = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
    pre.textContent = body.lines.join("\n");
    if (atBottom) pre.scrollTop = pre.scrollHeight;
  }

  async function showSession(id) {
    state.selected = id;
    renderSessions();
    const session = await getJson(`/v1/sessions/${encodeURIComponent(id)}`).catch((err) => {
      if (!(err instanceof net.Unauthorized)) $("session-view").replaceChildren(el("p", { class: "error", text: String(err.message) }));
      return null;
    });
    if (!session || state.selected !== id) return;
    const items = session.messages.map((m) => el("div", { class: `message ${m.role}` }, [
      el("div", { class: "who", text: `${m.role}${m.model ? ` · ${m.model}` : ""}` }),
      el("div", { class: "content", text: messageText(m.content) }),
    ]));
    if (session.system_prompt) items.unshift(el("p", { class: "muted", text: `system prompt: ${session.system_prompt}` }));
    $("session-view").replaceChildren(el("h3", { class: "mono", text: session.id }), ...items);
  }

  // The parts not carried by the feed; failures show in the feed badge, not as alerts.
  function refresh(...loaders) {
    return Promise.all(loaders.map((load) => load().catch((err) => {
      if (!(err instanceof net.Unauthorized)) console.warn(err);
    })));
  }

  // ---- actions ----

  async function switchTo(name) {
    state.switching = true;
    startProgress(null, state.status ? state.status.active_model : null, name);
    renderProgress();
    renderModels();
    try {
      const resp = await api("/admin/switch", {
        method: "POST",
        headers: { "content-type": "application/json" },
        body: JSON.stringify({ model: name, stream: true }),
      });
      if (!resp.ok) {
        failProgress(await net.errorMessage(resp));
        return;
      }
      for await (const { event, data } of net.readEvents(resp)) {
        if (event === "phase") onPhase(data);
        else if (event === "report") onReport(data);
        else if (event === "error") failProgress(data.message);
      }
    } catch (err) {
      if (!(err instanceof net.Unauthorized)) failProgress(String(err.message || err));
    } finally {
      state.switching = false;
      renderModels();
    }
  }

  function failProgress(message) {
    const msg = $("switch-message");
    msg.className = "failed";
    msg.textContent = `failed: ${message}`;
  }

  // ---- the playground: one request to any endpoint a model serves ----

  // Options of a <select>, kept as they are when the same (a user's choice stays).
  function setOptions(select, values, labelOf, preferred) {
    const same = select.options.length === values.length &&
      values.every((value, i) => select.options[i].value === value);
    const keep = select.value;
    if (!same) {
      select.replaceChildren(...values.map((value) => el("option", { value, text: labelOf(value) })));
    }
    const chosen = values.includes(keep) && same ? keep : values.includes(preferred) ? preferred : values[0];
    if (chosen !== undefined) select.value = chosen;
    return !same || chosen !== keep;
  }

  function renderPlayground() {
    const ids = [...state.models.values()].filter((m) => m.endpoints).map((m) => m.id);
    const active = state.status ? state.status.active_model : null;
    let changed = setOptions($("try-model"), ids, (id) => id, active);
    const model = state.models.get($("try-model").value);
    const paths = playground.endpointsFor(model);
    changed = setOptions($("try-endpoint"), paths, playground.label, $("try-endpoint").value) || changed;
    $("try-send").disabled = !paths.length || state.tryAbort !== null;
    if (changed || !$("try-body").value) resetExample();
  }

  function resetExample() {
    const model = $("try-model").value, path = $("try-endpoint").value;
    if (!model || !path) return;
    $("try-stream").disabled = !playground.streams(path);
    $("try-stream-label").hidden = !playground.streams(path);
    $("try-body").value = JSON.stringify(playground.example(path, model, state.tokens.get(model)), null, 2);
  }

  function tryState(word, text) {
    $("try-result").dataset.state = word;
    const status = $("try-status");
    status.className = word === "failed" ? "failed" : "muted";
    status.textContent = text;
  }

  // data that is not JSON (a chat stream's last `[DONE]`) comes as its text
  const lenient = (text) => {
    try {
      return JSON.parse(text);
    } catch {
      return text;
    }
  };

  async function trySend(event) {
    event.preventDefault();
    state.trySent += 1;
    $("try-result").dataset.sent = String(state.trySent);
    const path = $("try-endpoint").value;
    let body;
    try {
      body = JSON.parse($("try-body").value);
    } catch (err) {
      tryState("failed", `the body is not JSON: ${err.message}`);
      return;
    }
    if (body === null || typeof body !== "object" || Array.isArray(body)) {
      tryState("failed", "the body must be a JSON object");
      return;
    }
    const stream = playground.streams(path) && $("try-stream").checked;
    if (playground.streams(path)) body.stream = stream;
    const controller = new AbortController();
    state.tryAbort = controller;
    $("try-send").disabled = true;
    $("try-stop").disabled = false;
    $("try-answer").textContent = "";
    $("try-raw").textContent = "";
    tryState("running", `POST ${path}…`);
    const t0 = performance.now();
    const took = () => `${Math.round(performance.now() - t0)} ms`;
    try {
      const resp = await api(path, {
        method: "POST",
        headers: { "content-type": "application/json" },
        body: JSON.stringify(body),
        signal: controller.signal,
      });
      if (!resp.ok) {
        const message = await net.errorMessage(resp);
        tryState("failed", `HTTP ${resp.status}: ${message}`);
        return;
      }
      if (stream && (resp.headers.get("content-type") || "").includes("text/event-stream")) {
        tryState("running", `${resp.status}, streaming…`);
        let events = 0;
        const raw = [];
        for await (const { event: name, data } of net.readEvents(resp, lenient)) {
          if (name === "keepalive") continue;
          events += 1;
          if (raw.length < 200) raw.push(typeof data === "string" ? data : JSON.stringify(data));
          const error = playground.streamError(name, data);
          if (error) {
            tryState("failed", `stream error: ${error}`);
            return;
          }
          const text = playground.delta(path, name, data);
          if (text) $("try-answer").append(text);
          $("try-raw").textContent = raw.join("\n");
        }
        tryState("done", `${resp.status} · ${events} events · ${took()}`);
      } else {
        const answer = await resp.json();
        if (path === "/tokenize") state.tokens.set(body.model, playground.tokenIds(answer));
        $("try-answer").textContent = playground.answer(path, answer).join("\n");
        $("try-raw").textContent = JSON.stringify(answer, null, 2);
        tryState("done", `${resp.status} · ${took()}`);
      }
    } catch (err) {
      if (err.name === "AbortError") tryState("stopped", `stopped after ${took()}`);
      else if (!(err instanceof net.Unauthorized)) tryState("failed", String(err.message || err));
      else tryState("failed", "the admin key is needed");
    } finally {
      if (state.tryAbort === controller) state.tryAbort = null;
      $("try-send").disabled = false;
      $("try-stop").disabled = true;
    }
  }

  // ---- the live feed ----

  function onFeedEvent({ event, data }) {
    if (event === "status") {
      state.status = data;
      state.statusAt = performance.now();
      renderStatus();
    } else if (event === "phase") {
      onPhase(data);
    } else if (event === "report") {
      onReport(data);
      refresh(loadModels, loadSessions, loadLogs, loadCluster);
    } else if (event === "model") {
      const model = state.models.get(data.model) || { id: data.model };
      state.models.set(data.model, { ...model, status: data.status || model.status });
      renderModels();
    } else if (event === "resync") {
      refresh(loadModels, loadHistory, loadSessions, loadLogs, loadCluster);
    } else if (event === "keepalive") {
      refresh(loadSessions, loadLogs, loadCluster);
    }
  }

  function setFeed(word) {
    setBadge($("feed-state"), word);
  }

  const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

  async function runFeed() {
    state.feedRunning = true;
    let delay = 500;
    try {
      for (;;) {
        try {
          const resp = await api("/admin/events");
          if (!resp.ok) throw new Error(await net.errorMessage(resp));
          setFeed("live");
          delay = 500;
          // subscribed first, loaded second: nothing that happens in between is missed
          refresh(loadModels, loadHistory, loadSessions, loadLogs, loadCluster);
          for await (const event of net.readEvents(resp)) onFeedEvent(event);
        } catch (err) {
          if (err instanceof net.Unauthorized) return;
          console.warn("feed:", err);
        }
        setFeed("reconnecting");
        await sleep(delay);
        delay = Math.min(delay * 2, 10000);
      }
    } finally {
      state.feedRunning = false;
    }
  }

  function start() {
    if (!state.feedRunning) runFeed();
  }

  function init() {
    $("key-form").addEventListener("submit", useKey);
    $("forget-key").addEventListener("click", () => {
      net.forgetKey();
      location.reload();
    });
    $("logs-refresh").addEventListener("click", () => refresh(loadLogs));
    $("sessions-refresh").addEventListener("click", () => refresh(loadSessions));
    $("legend").replaceChildren(...charts.legend());
    $("try-form").addEventListener("submit", trySend);
    $("try-stop").addEventListener("click", () => state.tryAbort && state.tryAbort.abort());
    $("try-reset").addEventListener("click", resetExample);
    $("try-model").addEventListener("change", () => {
      renderPlayground();
      resetExample();
    });
    $("try-endpoint").addEventListener("change", resetExample);
    renderKv();
    setInterval(renderUptime, 1000); // a local clock: no request
    start();
  }

  // For tests and the curious: the state and the renderers (nothing here is needed to use the page).
  window.hotmodelDashboard = { state, renderHistory, renderStatus };

  init();
})();
