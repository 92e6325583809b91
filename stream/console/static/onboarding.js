// linewatch console: the onboarding page (new products: capture candidates, captured images, onboarding runs).
"use strict";

(() => {
  const { el, api, post, fmt, shot, debounce } = LW;
  const page = { title: "onboarding", picked: new Map() }; // product -> Set of selected candidate frame ids
  const LABEL = { onboard_started: "started", training_started: "training", training_finished: "trained",
                  released: "released", promoted: "promoted", rolled_back: "rolled back", refused: "refused" };

  function steps(run) {
    return el("ol", { class: "steps", data: { runId: run.run_id } },
      run.progress.map((s) => el("li", { class: "step " + s.state, data: { step: s.step, state: s.state },
                                         text: LABEL[s.step] || s.step })));
  }

  function runLine(run) {
    const d = Object.assign({}, ...run.steps.map((s) => s.detail));
    const bits = [fmt.time(run.started_ms), d.model ? `${d.model}${d.version ? " v" + d.version : ""}` : null,
      d.images ? `${d.images} images` : null, d.runner || null, d.seconds ? `trained in ${d.seconds} s` : null,
      d.error ? `error: ${d.error}` : null, d.reasons && d.reasons.length ? d.reasons.join("; ") : null];
    return el("div", { class: "muted small", text: bits.filter(Boolean).join(" · ") });
  }

  function section(p, detectors) {
    const picked = page.picked.get(p.product) || new Set();
    page.picked.set(p.product, picked);
    const status = el("p", { class: "muted small onb-status" });
    const can = LW.config.actions_enabled;
    const running = p.runner && p.runner.rc === null;
    const det = el("select", { class: "detector", "aria-label": "detector" },
      detectors.map((d) => el("option", { value: d, text: d, selected: d === (LW.config.multi_task_detectors || [])[0] })));
    const act = async (path, body, what) => {
      status.className = "muted small onb-status";
      status.textContent = "sending...";
      const r = await post(path, body);
      status.className = "small onb-status " + (r.ok ? "ok" : "error");
      status.textContent = r.ok ? what(r.data) : `refused (HTTP ${r.status}): ${r.data.error || ""}`;
      if (r.ok) reload();
    };
    const served = p.serving ? `served by ${p.serving.model} v${p.serving.version}` : null;
    const onboard = el("button", { class: "onboard", title: served || "",
      disabled: !can || running || !!served || LW.config.onboard_runner === "off",
      text: running ? "Onboarding..." : `Onboard ${p.product}`,
      onclick: () => act(`/api/onboarding/${encodeURIComponent(p.product)}/onboard`, { detector: det.value },
                         (d) => `onboarding started (${d.mode} runner, pid ${d.pid})`) });
    const capture = el("button", { class: "capture", disabled: !can, text: "Capture selected",
      onclick: () => {
        if (!picked.size) { status.textContent = "select candidate frames first"; return; }
        act(`/api/onboarding/${encodeURIComponent(p.product)}/select`, { frame_ids: [...picked] },
            (d) => { picked.clear(); return `capture of ${d.selected.length} frame(s) requested`; });
      } });
    const cands = el("div", { class: "cands" }, p.candidates.map((c) => {
      const box = el("input", { type: "checkbox", disabled: c.captured || !can, checked: picked.has(c.frame_id) });
      box.addEventListener("change", () => { if (box.checked) picked.add(c.frame_id); else picked.delete(c.frame_id); });
      return el("label", { class: "cand" + (c.captured ? " captured" : c.selected ? " selected" : ""),
                           data: { frameId: c.frame_id, captured: String(c.captured) } },
        shot(c.frame_id), el("span", { class: "small" }, box,
          c.captured ? " captured" : c.selected ? " requested" : ` ${c.camera || ""}`));
    }));
    const latest = p.runs[0];
    const runner = p.runner;
    return el("section", { class: "onb", data: { product: p.product } },
      el("h3", {}, el("span", { class: "cam", text: p.product }),
        el("span", { class: "muted", text: ` · ` }),
        el("span", { class: "captured", text: `${p.captured} images captured` }),
        served ? el("span", { class: "ok small served", text: ` · ${served}` }) : null,
        p.armed ? el("span", { class: "muted small", text: ` · capture armed until ${fmt.clock(p.armed.until_ms)} (${p.armed.camera || ""})` }) : null),
      p.refused ? el("p", { class: "error small refused", data: { reason: p.refused.reason || "" },
                            text: `capture refused (${p.refused.reason}): ${p.refused.message}` }) : null,
      latest ? steps(latest) : el("p", { class: "muted small", text: "not onboarded yet" }),
      latest ? runLine(latest) : null,
      el("div", { class: "feedback" }, det, onboard, capture),
      status,
      runner ? el("details", { class: "runner" },
        el("summary", { text: `linewatch onboard (${runner.mode}): ${runner.rc === null ? "running" : "exit " + runner.rc}` }),
        runner.progress ? el("p", { class: "muted small progress", text: runner.progress.text }) : null,
        el("pre", { text: (runner.output || []).join("\n") })) : null,
      p.candidates.length ? el("p", { class: "muted small", text: "Frames DLQ'd as an unknown product (newest first): select the ones to capture." }) : null,
      cands,
      p.runs.length > 1 ? el("details", {}, el("summary", { text: `${p.runs.length - 1} earlier run(s)` }),
        p.runs.slice(1).map((r) => el("div", {}, steps(r), runLine(r)))) : null);
  }

  page.render = async (root) => {
    const data = await api("/api/onboarding");
    const detectors = LW.config.detectors || [];
    root.replaceChildren(
      el("h2", { text: `Onboarding (${data.products.length} product${data.products.length === 1 ? "" : "s"})` }),
      el("p", { class: "muted small", text: `Products the router could not judge. Onboard trains an adapter on the captured images (runner: ${data.runner}) and the controller rolls it out.` }),
      el("div", { id: "onboarding" }, data.products.length ? data.products.map((p) => section(p, detectors))
        : el("p", { class: "muted", text: "no unknown product seen" })));
  };
  const reload = debounce(() => { if (location.hash.startsWith("#/onboarding")) LW.render(); }, 600);
  page.on = { onboarding: reload, onboard_runner: reload, onboard_progress: reload, serving: reload };
  LW.page("onboarding", page);
})();
