// linewatch console pages: camera wall, defect gallery, defect detail, drift, models, throughput + DLQ.
"use strict";

(() => {
  const { el, api, post, fmt, shot, sparkline, table, debounce, svg } = LW;

  // ---------------------------------------------------------------- camera wall
  const wall = { title: "camera wall", tiles: new Map(), pending: new Map(), timer: null };

  function tile(c) {
    const verdict = c.is_anomaly ? "ANOMALY" : "OK";
    const defect = c.is_anomaly && c.has_defect ? { boxes: c.boxes || [] } : null;
    return el("section", { class: "tile" + (c.is_anomaly ? " anomalous" : ""), data: { camera: c.camera } },
      el("h3", {}, el("span", { class: "cam", text: c.camera }),
        el("span", { class: "muted", text: ` ${c.line || ""} ${c.product || ""}` })),
      el("a", { href: c.is_anomaly && c.has_defect ? `#/defect/${encodeURIComponent(c.frame_id)}` : "#/wall" },
        shot(c.frame_id, { hasFrame: c.has_frame !== false, defect })),
      el("div", { class: "verdict" },
        el("span", { class: "badge " + (c.is_anomaly ? "bad" : "good"), text: verdict }),
        el("span", { class: "score", text: ` score ${fmt.score(c)}` })),
      sparkline(c.scores, c.score_normalized !== null && c.score_normalized !== undefined ? 0.5 : c.threshold),
      el("div", { class: "muted small",
        text: `${c.model || "-"} v${c.version || "-"} · ${c.frames || 0} frames, ${c.anomalies || 0} flagged · ${fmt.clock(c.ts_ms)}` }));
  }

  function drawWall(root) {
    const grid = el("div", { class: "wall", id: "wall" });
    const cams = [...wall.tiles.values()].sort((a, b) => a.camera.localeCompare(b.camera));
    if (!cams.length) grid.append(el("p", { class: "muted", text: "no camera has reported a result yet" }));
    for (const c of cams) grid.append(tile(c));
    root.replaceChildren(el("h2", { text: `Camera wall (${cams.length})` }), grid);
  }

  wall.render = async (root) => {
    const data = await api("/api/cameras");
    // least recently seen first, so a live result re-inserts its camera at the end and the cap evicts the oldest
    const byAge = data.cameras.slice().sort((a, b) => (a.processed_ts_ms || 0) - (b.processed_ts_ms || 0));
    wall.tiles = new Map(byAge.map((c) => [c.camera, c]));
    wall.root = root;
    drawWall(root);
  };
  wall.flush = () => {
    wall.timer = null;
    const grid = document.getElementById("wall");
    if (!grid) return;
    if (wall.evicted) { wall.evicted = false; wall.pending.clear(); drawWall(wall.root); return; }
    for (const c of wall.pending.values()) {
      const old = grid.querySelector(`.tile[data-camera="${CSS.escape(c.camera)}"]`);
      if (old) old.replaceWith(tile(c)); else { drawWall(wall.root); break; }
    }
    wall.pending.clear();
  };
  wall.on = {
    result(r) {
      const c = wall.tiles.get(r.camera) || { camera: r.camera, scores: [], frames: 0, anomalies: 0 };
      c.scores = (c.scores || []).concat([r.score_normalized ?? r.score]).slice(-60);
      Object.assign(c, r, { frames: (c.frames || 0) + 1, anomalies: (c.anomalies || 0) + (r.is_anomaly ? 1 : 0),
                            has_frame: true });
      wall.tiles.delete(r.camera); // re-inserted: the Map's order is least recently seen first
      wall.tiles.set(r.camera, c);
      const cap = LW.config.max_cameras || 256;
      for (const old of wall.tiles.keys()) { // past the cap the least recently seen tile goes (as on the server)
        if (wall.tiles.size <= cap) break;
        wall.tiles.delete(old);
        wall.pending.delete(old);
        wall.evicted = true;
      }
      wall.pending.set(r.camera, c);
      if (!wall.timer) wall.timer = setTimeout(wall.flush, 700); // at most ~1.5 redraws/s per camera
    },
    defect(d) {
      const c = wall.tiles.get(d.camera);
      if (c && c.frame_id === d.frame_id) {
        Object.assign(c, { has_defect: true, boxes: d.boxes });
        wall.pending.set(d.camera, c);
        if (!wall.timer) wall.timer = setTimeout(wall.flush, 300);
      }
    },
  };
  wall.dispose = () => { clearTimeout(wall.timer); wall.timer = null; wall.pending.clear(); };
  LW.page("wall", wall);

  // ---------------------------------------------------------------- defect gallery
  const gallery = { title: "defects", filters: {} };

  function select(name, options, value) {
    const s = el("select", { name, id: `f-${name}` }, el("option", { value: "", text: `any ${name}` }));
    for (const o of options) s.append(el("option", { value: o, text: o, selected: o === value }));
    return s;
  }

  function toLocalInput(ms) {
    if (!ms) return "";
    const d = new Date(Number(ms));
    return new Date(d.getTime() - d.getTimezoneOffset() * 60000).toISOString().slice(0, 16);
  }

  function card(d) {
    return el("a", { class: "card" + (d.verdict ? " " + d.verdict : ""), href: `#/defect/${encodeURIComponent(d.frame_id)}`,
                     data: { frameId: d.frame_id, camera: d.camera } },
      shot(d.frame_id, { hasFrame: d.has_frame, defect: d }),
      el("div", { class: "small" }, el("b", { text: fmt.score(d) }), ` ${d.camera} · ${d.product || "-"}`),
      el("div", { class: "muted small", text: `${fmt.time(d.ts_ms)} · ${d.boxes.length} box(es)` }),
      d.verdict ? el("span", { class: "badge " + (d.verdict === "confirmed" ? "bad" : "good"), text: d.verdict.replace("_", " ") }) : null);
  }

  gallery.render = async (root) => {
    const f = gallery.filters;
    const q = new URLSearchParams(Object.entries(f).filter(([, v]) => v));
    const data = await api("/api/defects?" + q.toString());
    const form = el("form", { class: "filters", id: "filters" },
      select("line", data.facets.line, f.line), select("camera", data.facets.camera, f.camera),
      select("product", data.facets.product, f.product),
      el("label", {}, "from ", el("input", { type: "datetime-local", name: "since", value: toLocalInput(f.since) })),
      el("label", {}, "to ", el("input", { type: "datetime-local", name: "until", value: toLocalInput(f.until) })),
      select("verdict", ["unreviewed", "confirmed", "false_alarm"], f.verdict),
      el("button", { type: "submit", text: "Filter" }),
      el("button", { type: "button", text: "Clear", onclick: () => { gallery.filters = {}; LW.render(); } }));
    form.addEventListener("submit", (ev) => {
      ev.preventDefault();
      const fd = new FormData(form);
      const t = (v) => (v ? String(new Date(v).getTime()) : "");
      gallery.filters = { line: fd.get("line"), camera: fd.get("camera"), product: fd.get("product"),
                          since: t(fd.get("since")), until: t(fd.get("until")), verdict: fd.get("verdict") };
      LW.render();
    });
    const grid = el("div", { class: "gallery", id: "gallery" }, data.items.map(card));
    if (!data.items.length) grid.append(el("p", { class: "muted", text: "no defect event matches" }));
    root.replaceChildren(el("h2", { text: `Defects (${data.matched} of ${data.kept} kept)` }), form, grid);
  };
  const reloadGallery = debounce(() => { if (location.hash.startsWith("#/defects")) LW.render(); }, 800);
  gallery.on = { defect: reloadGallery, feedback: reloadGallery };
  LW.page("defects", gallery);

  // ---------------------------------------------------------------- defect detail + feedback
  const detail = { title: "defect" };
  detail.render = async (root, frameId) => {
    const d = await api(`/api/defects/${encodeURIComponent(frameId)}`);
    const status = el("p", { id: "feedback-status", class: "muted" },
      LW.config.actions_enabled ? (LW.token ? "" : "enter the console token above to give feedback")
        : LW.config.actions_note || "actions are disabled");
    const send = async (verdict) => {
      status.textContent = "sending...";
      const r = await post(`/api/defects/${encodeURIComponent(frameId)}/feedback`, { verdict, note: note.value });
      status.className = r.ok ? "ok" : "error";
      status.textContent = r.ok ? `recorded: ${verdict.replace("_", " ")} (feedback ${r.data.feedback_id})`
        : `not recorded (HTTP ${r.status}): ${r.data.error || ""}`;
    };
    const note = el("input", { id: "feedback-note", type: "text", maxlength: 500, placeholder: "note (optional)" });
    const disabled = !LW.config.actions_enabled;
    const lat = Object.entries(d.latency_ms || {}).map(([k, v]) => `${k} ${v} ms`).join(", ");
    root.replaceChildren(
      el("h2", { text: `Defect ${d.frame_id}` }),
      el("div", { class: "detail" },
        shot(d.frame_id, { hasFrame: d.has_frame, defect: d, big: true }),
        el("div", {},
          table(["field", "value"], [
            ["camera", d.camera], ["line", d.line], ["product", d.product], ["model", `${d.model} v${d.version}`],
            ["score", fmt.score(d)], ["raw score / threshold", `${fmt.num(d.score, 6)} / ${fmt.num(d.threshold, 6)}`],
            ["map threshold", fmt.num(d.map_threshold, 6)], ["boxes", String(d.boxes.length)],
            ["frame time", fmt.time(d.ts_ms)], ["ground truth", d.gt_label ? `${d.gt_label} ${d.gt_defect || ""}` : "-"],
            ["latency", lat || "-"], ["verdict", d.verdict ? d.verdict.replace("_", " ") : "unreviewed"],
          ], "defect-fields"),
          el("div", { class: "feedback" },
            el("button", { id: "btn-confirm", class: "bad", disabled, onclick: () => send("confirmed"), text: "Confirm defect" }),
            el("button", { id: "btn-false-alarm", class: "good", disabled, onclick: () => send("false_alarm"), text: "False alarm" }),
            note),
          status,
          el("p", { class: "muted small", text: "Feedback feeds the per-product threshold proposal on the Models page; it never changes a threshold." }))));
  };
  LW.page("defect", detail);

  // ---------------------------------------------------------------- drift
  const drift = { title: "drift alerts" };
  drift.render = async (root) => {
    const data = await api("/api/drift");
    const rows = data.alerts.map((a) => [fmt.time(a.ts_ms), a.detector, a.key, fmt.num(a.statistic),
      fmt.num(a.threshold), a.p_value === null ? "-" : fmt.num(a.p_value), String(a.window ?? "-"), a.reference]);
    root.replaceChildren(el("h2", { text: `Drift alerts (${rows.length})` }),
      rows.length ? table(["time", "detector", "key", "statistic", "threshold", "p", "window", "reference"], rows, "drift")
        : el("p", { class: "muted", text: "no drift alert" }));
  };
  drift.on = { drift: debounce(() => LW.render(), 500) };
  LW.page("drift", drift);

  // ---------------------------------------------------------------- models
  const models = { title: "models" };
  models.render = async (root) => {
    const m = await api("/api/models");
    const serving = m.serving.map((e) => [e.product, e.model, `v${e.version}`, e.detector || "-", fmt.time(e.updated_ms)]);
    // the operating point each product is judged at (per task for a multi-task model)
    const ops = m.serving.map((e) => {
      const o = e.operating_point || {};
      const n = [o.n_good !== undefined ? `${o.n_good} good` : null,
                 o.n_synthetic !== undefined ? `${o.n_synthetic} synthetic` : null].filter(Boolean).join(", ");
      const fam = Object.entries(o.estimated_recall_by_family || {}).map(([k, v]) => `${k} ${fmt.pct(v)}`).join(", ");
      return [e.product, o.stated === false ? "not stated (older version)" : fmt.pct(o.target_false_alarm_rate),
        fmt.pct(o.estimated_false_alarm_rate), fmt.pct(o.estimated_recall), fam || "-", n || "-",
        fmt.num(e.threshold, 6)];
    });
    const props = m.proposals.map((p) => [p.product, `${p.model} v${p.model_version}`, fmt.num(p.current, 6),
      p.proposed === null ? "no proposal" : fmt.num(p.proposed, 6), `${p.confirmed} / ${p.false_alarms}`,
      String(p.removed), p.reason]);
    const roll = [];
    for (const r of m.rollouts) {
      for (const h of r.history) {
        roll.push([r.model, h.type, `v${h.version}`, fmt.time(h.ts_ms), (h.reasons || []).join("; ") || "-"]);
      }
    }
    const status = m.rollouts.map((r) => [r.model, r.serving_version ? `v${r.serving_version}` : "-",
      r.candidate_version ? `v${r.candidate_version}` : "-", r.last_event || "-"]);
    root.replaceChildren(
      el("h2", { text: "Serving (serving-state)" }),
      serving.length ? table(["product", "model", "version", "detector", "since"], serving, "serving")
        : el("p", { class: "muted", id: "serving", text: "the serving state is empty (static routing)" }),
      el("h2", { text: "Operating points" }),
      el("p", { class: "muted small", text: "False-alarm rate: flagged good parts, estimated on held-out good images; recall: on synthetic defects. The normalised score is 0.5 at the threshold." }),
      ops.length ? table(["product", "target false-alarm rate", "est. false-alarm rate", "est. recall", "recall by family", "n", "raw threshold"], ops, "operating-points")
        : el("p", { class: "muted", id: "operating-points", text: "no serving state: no operating point to show" }),
      el("h2", { text: "Threshold proposals from operator feedback" }),
      el("p", { class: "muted small", text: "Proposal = midpoint between the highest false-alarm score below the lowest confirmed score and that lowest confirmed score. Shown only: applied only through a release." }),
      props.length ? table(["product", "serving", "current", "proposed", "confirmed / false alarms", "false alarms removed", "why"], props, "proposals")
        : el("p", { class: "muted", id: "proposals", text: "no feedback yet" }),
      el("h2", { text: "Rollouts" }),
      status.length ? table(["model", "serving", "candidate", "last event"], status, "rollout-status") : null,
      roll.length ? table(["model", "event", "version", "time", "reasons"], roll, "rollouts")
        : el("p", { class: "muted", text: "no model event seen" }));
  };
  const reloadModels = debounce(() => LW.render(), 500);
  models.on = { serving: reloadModels, model_event: reloadModels, feedback: reloadModels };
  LW.page("models", models);

  // ---------------------------------------------------------------- throughput + DLQ
  const tp = { title: "throughput" };
  function bars(per, anom, w = 600, h = 120) {
    const s = svg("svg", { class: "bars", viewBox: `0 0 ${w} ${h}`, width: w, height: h });
    const mx = Math.max(1, ...per);
    const bw = w / per.length;
    per.forEach((v, i) => {
      const bh = (v / mx) * (h - 14);
      s.append(svg("rect", { class: "bar", x: i * bw + 1, y: h - bh, width: bw - 2, height: bh }));
      const ah = (anom[i] / mx) * (h - 14);
      if (ah) s.append(svg("rect", { class: "bar-anom", x: i * bw + 1, y: h - ah, width: bw - 2, height: ah }));
    });
    const t = svg("text", { x: 4, y: 11, class: "axis" });
    t.textContent = `max ${mx}/s`;
    s.append(t);
    return s;
  }
  function drawTp(root, t) {
    const lat = (p) => (p ? `p50 ${p.p50} · p95 ${p.p95} · p99 ${p.p99} ms` : "-");
    const dlq = Object.entries(t.dlq_by_reason).map(([r, n]) => [r, String(n), String(t.dlq_recent_by_reason[r] || 0)]);
    const recent = t.dlq_recent.map((d) => [fmt.clock(d.ts_ms), d.reason, d.camera, d.frame_id, d.detail]);
    root.replaceChildren(
      el("h2", { text: "Throughput and latency" }),
      el("div", { class: "kpis", id: "kpis" },
        el("div", {}, el("b", { id: "fps", text: String(t.fps_10s) }), " frames/s (10 s)"),
        el("div", {}, el("b", { text: String(t.totals.results || 0) }), " results"),
        el("div", {}, el("b", { text: String(t.totals.defects || 0) }), " defect events"),
        el("div", {}, el("b", { text: String(t.totals.dlq || 0) }), " DLQ"),
        el("div", {}, el("b", { text: String(t.cameras) }), " cameras")),
      el("p", {}, `frames per second over the last ${t.window_s} s (red: flagged)`),
      bars(t.per_second, t.anomalies_per_second),
      table(["latency (last 60 s)", "value"], [["end to end", lat(t.e2e_ms)], ["Triton batch call", lat(t.infer_ms)]], "latency"),
      el("h2", { text: "DLQ by reason" }),
      dlq.length ? table(["reason", "records", "last 60 s"], dlq, "dlq") : el("p", { class: "muted", id: "dlq", text: "no DLQ record" }),
      recent.length ? table(["time", "reason", "camera", "frame", "detail"], recent, "dlq-recent") : null);
  }
  tp.render = async (root) => { tp.root = root; drawTp(root, await api("/api/throughput")); };
  tp.on = { stats: (t) => { if (tp.root && document.getElementById("kpis")) drawTp(tp.root, t); } };
  LW.page("throughput", tp);
})();
