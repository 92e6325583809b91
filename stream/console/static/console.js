// linewatch console: the shared pieces (DOM helpers, API, live events, router, token). Pages: pages.js.
// No framework, no build step. Every text from the server goes through textContent, never innerHTML.
"use strict";

const LW = (() => {
  const pages = {};
  const handlers = {};
  let current = null;
  let token = sessionStorage.getItem("lw-token") || "";
  let config = { actions_enabled: false };

  function el(tag, props, ...children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(props || {})) {
      if (v === undefined || v === null || v === false) continue;
      if (k === "class") e.className = v;
      else if (k === "text") e.textContent = String(v);
      else if (k === "data") for (const [dk, dv] of Object.entries(v)) e.dataset[dk] = dv;
      else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
      else e.setAttribute(k, v === true ? "" : String(v));
    }
    for (const c of children.flat()) {
      if (c === null || c === undefined || c === false) continue;
      e.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return e;
  }

  function svg(tag, attrs) {
    const e = document.createElementNS("http://www.w3.org/2000/svg", tag);
    for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, String(v));
    return e;
  }

  async function api(path) {
    const r = await fetch(path, { headers: { Accept: "application/json" } });
    if (!r.ok) throw new Error(`${path}: HTTP ${r.status}`);
    return r.json();
  }

  async function post(path, body) {
    const headers = { "Content-Type": "application/json" };
    if (token) headers.Authorization = "Bearer " + token;
    const r = await fetch(path, { method: "POST", headers, body: JSON.stringify(body) });
    let data = {};
    try { data = await r.json(); } catch (_) { /* empty body */ }
    return { ok: r.ok, status: r.status, data };
  }

  const fmt = {
    time(ms) { return ms ? new Date(ms).toLocaleString() : "-"; },
    clock(ms) { return ms ? new Date(ms).toLocaleTimeString() : "-"; },
    num(v, d = 4) {
      if (v === null || v === undefined || Number.isNaN(v)) return "-";
      const a = Math.abs(v);
      return a !== 0 && (a < 1e-3 || a >= 1e5) ? Number(v).toExponential(2) : Number(v).toFixed(d);
    },
    // what an operator reads: the normalised score (0.5 = the threshold); raw score / threshold from older workers
    score(r) {
      if (r.score_normalized !== null && r.score_normalized !== undefined) {
        return `${Number(r.score_normalized).toFixed(2)} (thr 0.5)`;
      }
      return `${fmt.num(r.score)} (thr ${fmt.num(r.threshold)})`;
    },
    pct(v) {
      if (v === null || v === undefined || Number.isNaN(Number(v))) return "-";
      return `${Number((100 * v).toPrecision(3))}%`;
    },
  };

  // images need the console token; an <img> cannot set headers, so it goes in the query (no access log is kept)
  const imgToken = () => (token ? "?token=" + encodeURIComponent(token) : "");

  // a frame thumbnail with the defect heat map and its boxes on top (boxes are normalised x, y, w, h)
  function shot(frameId, { hasFrame = true, defect = null, big = false } = {}) {
    const box = el("div", { class: "shot" + (big ? " big" : ""), data: { frameId } });
    const ph = el("div", { class: "placeholder", text: "no frame" });
    if (hasFrame) {
      const img = el("img", { class: "frame", alt: "frame " + frameId, src: `/img/frame/${encodeURIComponent(frameId)}.jpg${imgToken()}` });
      img.addEventListener("error", () => { img.remove(); box.prepend(ph); });
      box.append(img);
    } else {
      box.append(ph);
    }
    if (defect) {
      box.append(el("img", { class: "heat", alt: "", src: `/img/heatmap/${encodeURIComponent(frameId)}.png${imgToken()}` }));
      for (const b of defect.boxes || []) {
        const d = el("div", { class: "box", title: `area ${fmt.num(b.area, 3)} peak ${fmt.num(b.peak, 3)}` });
        d.style.left = `${(b.x || 0) * 100}%`;
        d.style.top = `${(b.y || 0) * 100}%`;
        d.style.width = `${(b.w || 0) * 100}%`;
        d.style.height = `${(b.h || 0) * 100}%`;
        box.append(d);
      }
    }
    return box;
  }

  // score trend with the threshold as a dashed line
  function sparkline(scores, threshold, w = 220, h = 40) {
    const s = svg("svg", { class: "spark", viewBox: `0 0 ${w} ${h}`, width: w, height: h, role: "img" });
    if (!scores || !scores.length) return s;
    const vals = scores.concat(threshold === undefined || threshold === null ? [] : [threshold]);
    let lo = Math.min(...vals), hi = Math.max(...vals);
    if (hi - lo < 1e-12) { hi += 1; lo -= 1; }
    const y = (v) => h - 3 - ((v - lo) / (hi - lo)) * (h - 6);
    const step = scores.length > 1 ? w / (scores.length - 1) : 0;
    const pts = scores.map((v, i) => `${(i * step).toFixed(1)},${y(v).toFixed(1)}`).join(" ");
    if (threshold !== undefined && threshold !== null) {
      s.append(svg("line", { class: "thr", x1: 0, x2: w, y1: y(threshold), y2: y(threshold) }));
    }
    s.append(svg("polyline", { class: "trend", points: pts }));
    scores.forEach((v, i) => {
      if (threshold !== null && v > threshold) s.append(svg("circle", { class: "hot", cx: i * step, cy: y(v), r: 2 }));
    });
    return s;
  }

  function table(cols, rows, id) {
    const t = el("table", { id });
    t.append(el("thead", {}, el("tr", {}, cols.map((c) => el("th", { text: c })))));
    const tb = el("tbody");
    for (const r of rows) tb.append(el("tr", {}, r.map((c) => (c instanceof Node ? el("td", {}, c) : el("td", { text: c ?? "-" })))));
    t.append(tb);
    return t;
  }

  function debounce(fn, ms) {
    let t = null;
    return (...a) => { clearTimeout(t); t = setTimeout(() => fn(...a), ms); };
  }

  // ---------------------------------------------------------------- live events
  function on(kind, fn) { (handlers[kind] = handlers[kind] || []).push(fn); }

  let source = null;
  let retry = null;
  function connect() {
    const live = document.getElementById("live");
    if (source) source.close();
    clearTimeout(retry);
    // the token reaches the live-update slots kept for token holders (EventSource cannot set headers)
    const es = source = new EventSource("/events" + (token ? "?token=" + encodeURIComponent(token) : ""));
    let opened = false;
    es.addEventListener("hello", () => {
      live.textContent = "live"; live.className = "live on";
      if (opened) render(); // reconnected: what was missed is in the views
      opened = true;
    });
    es.onerror = () => {
      live.textContent = "reconnecting"; live.className = "live off";
      // refused (all live slots taken: 503, a wrong token: 401): EventSource gives up, so try again later
      if (es.readyState === EventSource.CLOSED && source === es) retry = setTimeout(connect, 10000);
    };
    for (const kind of ["result", "defect", "drift", "dlq", "serving", "model_event", "feedback", "onboarding", "onboard_runner", "onboard_progress", "stats"]) {
      es.addEventListener(kind, (ev) => {
        let data;
        try { data = JSON.parse(ev.data); } catch (_) { return; }
        if (current && current.on && current.on[kind]) current.on[kind](data);
        for (const fn of handlers[kind] || []) fn(data);
      });
    }
  }

  // ---------------------------------------------------------------- router
  function page(name, def) { pages[name] = def; }

  async function render() {
    const [, name = "wall", ...rest] = (location.hash || "#/wall").split("/");
    const def = pages[name] || pages.wall;
    if (current && current.dispose) current.dispose();
    current = def;
    for (const a of document.querySelectorAll("#nav a")) a.classList.toggle("active", a.dataset.page === name);
    const root = document.getElementById("page");
    root.replaceChildren(el("p", { class: "muted", text: "loading..." }));
    document.title = `linewatch console: ${def.title}`;
    try {
      await def.render(root, decodeURIComponent(rest.join("/")));
    } catch (e) {
      root.replaceChildren(el("p", { class: "error", text: String(e) }));
    }
  }

  function showActions() {
    const a = document.getElementById("actions");
    if (!config.actions_enabled) {
      a.textContent = "read-only (no token configured)"; a.className = "actions off";
      a.title = config.actions_note || "";
    } else {
      a.textContent = token ? "actions: token set" : "actions need a token"; a.className = "actions" + (token ? " on" : "");
    }
  }

  async function start() {
    const form = document.getElementById("token-form");
    document.getElementById("token").value = token;
    form.addEventListener("submit", (ev) => {
      ev.preventDefault();
      token = document.getElementById("token").value.trim();
      if (token) sessionStorage.setItem("lw-token", token); else sessionStorage.removeItem("lw-token");
      showActions();
      connect(); // live updates with (or without) the token now
    });
    try { config = await api("/api/config"); } catch (_) { /* keep defaults */ }
    showActions();
    window.addEventListener("hashchange", render);
    connect();
    render();
  }

  return { el, svg, api, post, fmt, shot, sparkline, table, debounce, on, page, render, start,
           get config() { return config; }, get token() { return token; } };
})();

document.addEventListener("DOMContentLoaded", () => LW.start());
