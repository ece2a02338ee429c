/* The selfreward dashboard: one page, routed by location (every view has its own URL).
 *   /ui/                                   runs
 *   /ui/runs/{run}                         config, iteration timeline, metrics and curves
 *   /ui/runs/{run}/iterations/{t}          stages, progress, errors, counts; start/resume/cancel
 *   /ui/runs/{run}/iterations/{t}/data     data browser, evaluation examples
 * Data: /ui/api/... (JSON). Live: polls every 1.5 s while something runs, every 10 s otherwise. Actions (coordinator
 * only) call the API's POST routes with the bearer token kept in sessionStorage.
 */
(function () {
  "use strict";
  const API = "/ui/api";
  const LIVE = ["running", "queued", "waiting", "retrying", "waiting_for_setup", "worker_lost"];
  const POLL_MS = 1500;
  const IDLE_MS = 10000;
  const main = document.getElementById("main");
  let info = { mode: document.body.dataset.mode, writable: false, auth_required: false };
  let timer = null;

  // ------------------------------------------------------------------ helpers
  function h(tag, attrs, children) {
    const e = document.createElement(tag);
    for (const k in attrs || {}) {
      if (k === "text") e.textContent = attrs[k];
      else if (k === "class") e.className = attrs[k];
      else if (k.startsWith("on")) e.addEventListener(k.slice(2), attrs[k]);
      else if (attrs[k] !== null && attrs[k] !== undefined && attrs[k] !== false) e.setAttribute(k, attrs[k]);
    }
    [].concat(children || []).forEach(function (c) {
      if (c === null || c === undefined || c === false) return;
      e.appendChild(typeof c === "string" || typeof c === "number" ? document.createTextNode(String(c)) : c);
    });
    return e;
  }
  const enc = encodeURIComponent;
  function pct(v) { return v === null || v === undefined ? "n/a" : (100 * v).toFixed(1) + "%"; }
  function num(v, d) { return v === null || v === undefined ? "n/a" : Number(v).toFixed(d === undefined ? 2 : d); }
  function secs(s) {
    if (s === null || s === undefined) return "";
    s = Number(s);
    if (s < 90) return s.toFixed(s < 10 ? 1 : 0) + " s";
    if (s < 5400) return (s / 60).toFixed(1) + " min";
    return (s / 3600).toFixed(1) + " h";
  }
  function when(ts) { return ts ? new Date(ts * 1000).toLocaleString() : ""; }
  function state(s) { return h("span", { class: "state " + s, text: s }); }
  function token() { return sessionStorage.getItem("selfreward-token") || ""; }

  async function api(path, opts) {
    opts = opts || {};
    const headers = {};
    if (token()) headers.Authorization = "Bearer " + token();
    const r = await fetch(path, { method: opts.method || "GET", headers: headers });
    if (r.status === 401) { askToken("The coordinator needs its API token."); throw new Error("401: token needed"); }
    const body = await r.json().catch(function () { return {}; });
    if (!r.ok) throw new Error(r.status + ": " + (typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail)));
    return body;
  }
  function askToken(why) {
    const box = document.getElementById("auth");
    box.innerHTML = "";
    const input = h("input", { type: "password", placeholder: "API token", id: "token", autocomplete: "off" });
    box.appendChild(h("form", { onsubmit: function (ev) {
      ev.preventDefault(); sessionStorage.setItem("selfreward-token", input.value); location.reload();
    } }, [h("span", { class: "muted small", text: why }), input, h("button", { type: "submit", text: "Use token" })]));
  }
  function showToken() {
    const box = document.getElementById("auth");
    if (info.mode !== "coordinator") return;
    box.innerHTML = "";
    if (token()) box.appendChild(h("button", { text: "Forget token", onclick: function () {
      sessionStorage.removeItem("selfreward-token"); location.reload(); } }));
    else if (info.writable) box.appendChild(h("button", { text: "Token", onclick: function () { askToken("Actions need the API token."); } }));
  }
  function crumbs(parts) {
    const nav = document.getElementById("crumbs");
    nav.innerHTML = "";
    parts.forEach(function (p, i) {
      if (i) nav.appendChild(h("span", { class: "sep", text: "/" }));
      nav.appendChild(p[1] ? h("a", { href: p[1], text: p[0] }) : h("span", { text: p[0] }));
    });
  }
  function fail(err) {
    main.innerHTML = "";
    main.appendChild(h("div", { class: "error", text: String(err.message || err) }));
  }
  function poll(fn, live) {  // fast while something runs, slowly otherwise (a run started elsewhere shows up)
    clearTimeout(timer);
    timer = setTimeout(fn, live ? POLL_MS : IDLE_MS);
  }
  async function action(label, path, after) {
    if (!token()) { askToken("Actions need the API token."); return; }
    try {
      const r = await api(path, { method: "POST" });
      flash(label + ": " + (r.status || "ok") + (r.t !== undefined ? " (iteration " + r.t + ")" : ""));
      if (after) after(r);
    } catch (e) { flash(label + " failed: " + e.message, true); }
  }
  function flash(msg, bad) {  // outside #main: it stays while the view re-renders
    const f = document.getElementById("flash");
    f.className = bad ? "error" : "summary";
    f.textContent = msg;
  }

  // ------------------------------------------------------------------ runs
  async function runsView() {
    crumbs([["runs", null]]);
    const runs = await api(API + "/runs");
    main.innerHTML = "";
    main.appendChild(h("h1", { text: "Runs" }));
    if (!runs.length) { main.appendChild(h("p", { class: "muted", text: "No runs yet." })); }
    else {
      main.appendChild(h("table", { id: "runs" }, [
        h("tr", {}, ["run", "method", "base model", "iterations done", "status", "last change"].map(function (c) { return h("th", { text: c }); })),
      ].concat(runs.map(function (r) {
        return h("tr", { "data-run": r.run }, [
          h("td", {}, h("a", { href: "/ui/runs/" + enc(r.run), text: r.run })),
          h("td", { text: r.variant || "" }), h("td", { text: r.base_model || "" }),
          h("td", { class: "n", text: r.completed_iterations === undefined ? "" : r.completed_iterations + " / " + r.iterations_planned }),
          h("td", {}, [state(r.status), r.error ? h("span", { class: "muted small", text: " " + r.error }) : null]),
          h("td", { text: when(r.updated_at) }),
        ]);
      }))));
    }
    poll(function () { runsView().catch(fail); }, runs.some(function (r) { return LIVE.indexOf(r.status) >= 0; }));
  }

  // ------------------------------------------------------------------ one run
  function timelineTable(run) {
    return h("table", { id: "timeline" }, [h("tr", {}, ["iteration", "status", "stages", "time"].map(function (c) { return h("th", { text: c }); }))]
      .concat(run.timeline.map(function (it) {
        const total = it.stages.reduce(function (a, s) { return a + (Number(s.seconds) || 0); }, 0);
        return h("tr", { "data-t": it.t }, [
          h("td", {}, h("a", { href: "/ui/runs/" + enc(run.run) + "/iterations/" + it.t, text: it.t === 0 ? "0 (set-up)" : String(it.t) })),
          h("td", {}, state(it.status)),
          h("td", {}, h("div", { class: "timeline" }, it.stages.map(function (s) {
            const p = s.progress && s.state !== "done" && s.progress.total ? " " + s.progress.done + "/" + s.progress.total : "";
            return h("span", { class: "chip " + s.state, title: s.stage + ": " + s.state, text: s.stage + p });
          }))),
          h("td", { class: "n", text: secs(total) }),
        ]);
      })));
  }
  function configTable(rows) {
    const changed = rows.filter(function (r) { return !r.default; });
    const defaults = rows.filter(function (r) { return r.default; });
    function row(r) {
      return h("tr", {}, [h("td", { text: r.key }), h("td", { class: r.default ? "default" : "" }, [
        typeof r.value === "object" ? JSON.stringify(r.value) : String(r.value),
        r.default ? h("span", { class: "tag", text: "default" }) : null])]);
    }
    return h("details", { id: "config" }, [
      h("summary", { text: "Config: " + changed.length + " settings set, " + defaults.length + " defaults" }),
      h("table", { class: "config" }, changed.map(row)),
      h("details", { id: "config-defaults" }, [h("summary", { text: "the " + defaults.length + " defaults" }), h("table", { class: "config" }, defaults.map(row))]),
    ]);
  }
  function runActions(run) {
    if (!info.writable) return h("p", { class: "muted small", text: "Read-only (selfreward ui): start, resume and cancel from the coordinator's dashboard or the CLI." });
    const live = LIVE.indexOf(run.status) >= 0;
    return h("div", { class: "actions" }, [
      h("button", { class: "primary", id: "start", disabled: live ? "disabled" : null, text: "Start next iteration",
        onclick: function () { action("start", "/runs/" + enc(run.run) + "/iterations", function () { runView(run.run); }); } }),
      h("button", { id: "cancel", disabled: live ? null : "disabled", text: "Cancel",
        onclick: function () { action("cancel", "/runs/" + enc(run.run) + "/cancel", function () { runView(run.run); }); } }),
    ]);
  }
  function metricsSection(m) {
    const box = h("div", { id: "metrics" });
    const tr = m.trends || [];
    box.appendChild(h("h2", { text: "Metrics across iterations" }));
    if (tr.length) {
      box.appendChild(h("div", { id: "summaries" }, tr.map(function (r) { return summaryLine(r); })));
    } else box.appendChild(h("p", { class: "muted", text: "No evaluation yet." }));
    const charts = h("div", { class: "charts" });
    box.appendChild(charts);
    const xt = tr.map(function (r) { return [r.t, "M" + (r.t + 1)]; });
    function series(name, key) { return { name: name, points: tr.map(function (r) { return [r.t, r[key]]; }) }; }
    if (tr.length) {
      const wr = series("win rate vs previous", "win_rate");
      wr.intervals = tr.filter(function (r) { return r.interval; }).map(function (r) { return [r.t, r.interval[0], r.interval[1]]; });
      Charts.line(charts, { title: "Win rate M(t+1) vs M(t), 95% interval", series: [wr], yMin: 0, yMax: 1, percent: true, xTicks: xt, ref: 0.5 });
      Charts.line(charts, { title: "Judge: agreement with humans, parse failures, top-score share", percent: true, yMin: 0, yMax: 1, xTicks: xt,
        series: [series("agreement (pairwise acc.)", "judge_agreement"), series("parse failures", "parse_failure_rate"), series("top-score share", "top_share")] });
      Charts.line(charts, { title: "Pairs made", xTicks: xt, yMin: 0, series: [series("pairs", "pairs")] });
      Charts.line(charts, { title: "Mean length of chosen / rejected answers (chars)", xTicks: xt,
        series: [series("chosen", "chosen_length"), series("rejected", "rejected_length")] });
      const last = tr[tr.length - 1];
      if (last.score_shares) {
        Charts.bars(charts, { title: "Judge score distribution" + (tr.some(function (r) { return r.collapsed; }) ? " (collapse flagged)" : ""),
          labels: ["0", "1", "2", "3", "4", "5"], percent: true,
          series: tr.map(function (r) { return { name: "iteration " + r.t, values: ["0", "1", "2", "3", "4", "5"].map(function (k) { return (r.score_shares || {})[k] || 0; }) }; }) });
      }
    }
    const curves = m.curves || [];
    if (curves.length) {
      box.appendChild(h("h2", { text: "Training curves" }));
      const cc = h("div", { class: "charts", id: "curves" });
      box.appendChild(cc);
      const keys = [["loss", "Training loss"], ["rewards/margins", "DPO reward margin"], ["rewards/accuracies", "DPO reward accuracy"], ["mean_token_accuracy", "SFT token accuracy"]];
      keys.forEach(function (k) {
        const ss = curves.map(function (c) {
          return { name: c.model + (c.kind ? " (" + c.kind + ")" : ""), points: c.points.filter(function (p) { return p[k[0]] !== undefined; }).map(function (p) { return [p.step, p[k[0]]]; }) };
        }).filter(function (s) { return s.points.length; });
        if (ss.length) Charts.line(cc, { title: k[1] + " per step", series: ss, xLabel: "step" });
      });
    }
    const wall = m.wall || [];
    if (wall.length) {
      box.appendChild(h("h2", { text: "Wall time per stage" }));
      const stages = []; const ts = [];
      wall.forEach(function (w) { if (stages.indexOf(w.stage) < 0) stages.push(w.stage); if (ts.indexOf(w.t) < 0) ts.push(w.t); });
      box.appendChild(h("table", { id: "wall" }, [h("tr", {}, [h("th", { text: "stage" })].concat(ts.map(function (t) { return h("th", { text: "iter " + t }); })))]
        .concat(stages.map(function (s) {
          return h("tr", {}, [h("td", { text: s })].concat(ts.map(function (t) {
            const w = wall.find(function (x) { return x.t === t && x.stage === s; });
            return h("td", { class: "n", text: w ? secs(w.seconds) : "" });
          })));
        }))));
    }
    return box;
  }
  function summaryLine(r) {
    const s = r.sentence || { text: "", verdict: "" };
    return h("p", { class: "summary" + (s.evidence ? " evidence" : ""), "data-t": r.t }, [s.text + " ", h("strong", { class: "verdict-text", text: s.verdict + "." })]);
  }
  async function runView(name) {
    crumbs([["runs", "/ui/"], [name, null]]);
    const run = await api(API + "/runs/" + enc(name));
    const metrics = metricsSection(await api(API + "/runs/" + enc(name) + "/metrics"));
    const wasOpen = document.getElementById("config") && document.getElementById("config").open;
    const defaultsOpen = document.getElementById("config-defaults") && document.getElementById("config-defaults").open;
    main.innerHTML = "";
    main.appendChild(h("h1", {}, ["Run " + run.run + " ", state(run.status)]));
    main.appendChild(h("p", { class: "muted", text: run.variant + ", M0 = " + run.base_model + ", " + run.completed_iterations + " of " + run.iterations_planned + " iteration(s) done" + (run.artifacts ? "; " + run.artifacts : "") }));
    main.appendChild(runActions(run));
    main.appendChild(h("h2", { text: "Iterations" }));
    main.appendChild(timelineTable(run));
    main.appendChild(metrics);
    const config = configTable(run.config || []);
    if (wasOpen) config.open = true;
    if (defaultsOpen) config.querySelector("#config-defaults").open = true;
    main.appendChild(h("h2", { text: "Config" }));
    main.appendChild(config);
    poll(function () { runView(name).catch(fail); }, LIVE.indexOf(run.status) >= 0);
  }

  // ------------------------------------------------------------------ one iteration
  function stageRow(s) {
    const p = s.progress || null;
    const total = p && p.total ? p.total : null;
    const done = p ? p.done || 0 : 0;
    const frac = s.state === "done" ? 1 : total ? Math.min(1, done / total) : 0;
    const bar = h("div", { class: "bar", "data-done": done, "data-total": total === null ? "" : total }, h("div", { class: "fill", style: "width:" + (100 * frac).toFixed(1) + "%" }));
    let detail = "";
    if (p && s.state !== "done") {
      detail = (p.task || "") + " " + done + (total ? "/" + total : "") + (p.eta_s ? ", ETA " + secs(p.eta_s) : "") + (p.loss !== undefined ? ", loss " + num(p.loss, 4) : "");
    }
    const counts = s.counts ? Object.keys(s.counts).filter(function (k) {
      const v = s.counts[k]; return typeof v === "number" || (v && typeof v === "object" && !Array.isArray(v) && Object.keys(v).length < 6);
    }).map(function (k) { const v = s.counts[k]; return k + " " + (typeof v === "object" ? JSON.stringify(v) : (Number.isInteger(v) ? v : num(v, 3))); }).join(", ") : "";
    const peak = s.peak_rss_bytes ? "peak memory " + num(s.peak_rss_bytes / 1e9, 2) + " GB" : "";
    const rows = [h("tr", { class: "stage " + s.state, "data-stage": s.stage, "data-state": s.state }, [
      h("td", { text: s.stage }), h("td", {}, state(s.state)), h("td", {}, [bar, h("div", { class: "small muted progress-text", text: detail })]),
      h("td", { class: "n", text: s.state === "done" ? secs(s.seconds) : (p && p.stage_elapsed_s ? secs(p.stage_elapsed_s) : "") }),
      h("td", { class: "small", text: [counts + (s.shards ? " (" + s.shards.length + " shards)" : ""), peak].filter(Boolean).join("; ") }),
    ])];
    if (s.error) {
      const e = typeof s.error === "string" ? { message: s.error } : s.error;
      rows.push(h("tr", { class: "stage-error" }, h("td", { colspan: 5 }, h("div", { class: "error" },
        "stage " + (e.stage || s.stage) + (e.record ? ", record " + e.record : "") + ": " + e.message))));
    }
    return rows;
  }
  async function iterationView(name, t) {
    crumbs([["runs", "/ui/"], [name, "/ui/runs/" + enc(name)], ["iteration " + t, null]]);
    const it = await api(API + "/runs/" + enc(name) + "/iterations/" + t);
    main.innerHTML = "";
    main.appendChild(h("h1", {}, ["Iteration " + t + " of " + name + " ", state(it.status)]));
    main.appendChild(h("p", { class: "muted", text: (t === 0 ? "set-up: M0 -> M1" : it.model_in + " -> " + it.model_out) + (it.started_at ? "; started " + when(it.started_at) : "") + (it.attempt ? "; attempt " + (it.attempt + 1) : "") }));
    if (it.error) {
      const e = typeof it.error === "string" ? { message: it.error } : it.error;
      main.appendChild(h("div", { class: "error", id: "iteration-error" }, "failed in stage " + (it.failed_stage || e.stage) + (e.record ? " at record " + e.record : "") + ": " + e.message));
    }
    (it.warnings || []).forEach(function (w) { main.appendChild(h("div", { class: "error", text: w })); });
    if (info.writable) {
      const canResume = ["failed", "cancelled", "interrupted", "worker_lost"].indexOf(it.status) >= 0 && t >= 1;
      main.appendChild(h("div", { class: "actions" }, [
        h("button", { class: "primary", id: "resume", disabled: canResume ? null : "disabled", text: "Resume",
          onclick: function () { action("resume", "/runs/" + enc(name) + "/iterations/" + t + "/resume", function () { iterationView(name, t); }); } }),
        h("button", { id: "cancel", disabled: LIVE.indexOf(it.status) >= 0 ? null : "disabled", text: "Cancel run",
          onclick: function () { action("cancel", "/runs/" + enc(name) + "/cancel", function () { iterationView(name, t); }); } }),
      ]));
    }
    if (t >= 1) main.appendChild(h("p", {}, h("a", { href: "/ui/runs/" + enc(name) + "/iterations/" + t + "/data", id: "data-link", text: "Browse the data: prompts, candidates, verdicts, pairs ->" })));
    const table = h("table", { id: "stages" }, [h("tr", {}, ["stage", "state", "progress", "time", "counts"].map(function (c) { return h("th", { text: c }); }))]);
    it.stages.forEach(function (s) { stageRow(s).forEach(function (r) { table.appendChild(r); }); });
    main.appendChild(table);
    if (it.feedback) main.appendChild(h("p", { class: "small muted", text: "pairs: " + JSON.stringify(it.feedback) }));
    poll(function () { iterationView(name, t).catch(fail); }, LIVE.indexOf(it.status) >= 0);
  }

  // ------------------------------------------------------------------ data browser
  function candidateTable(item) {
    const pair = item.pair || {};
    return h("table", { class: "cands" }, [h("tr", {}, ["#", "answer", "score", "judge's verdict"].map(function (c) { return h("th", { text: c }); }))]
      .concat(item.candidates.map(function (c) {
        const cls = c.id && c.id === pair.chosen_id ? "chosen" : c.id && c.id === pair.rejected_id ? "rejected" : "";
        return h("tr", { class: cls, "data-candidate": c.id }, [
          h("td", { text: String(c.index) + (cls ? " (" + cls + ")" : "") }), h("td", { class: "text", text: c.text || "" }),
          h("td", { class: "n", text: c.score === null || c.score === undefined ? (c.failures ? "parse failure" : "-") : num(c.score, 2) }),
          h("td", {}, c.verdicts.map(function (v) { return h("div", { class: "verdict", text: (v.failure ? "[" + v.failure + "] " : "") + v.text }); })),
        ]);
      })));
  }
  function itemView(item) {
    const kids = [h("div", { class: "prompt", text: item.prompt }), h("div", { class: "small muted", text: item.prompt_id })];
    if (item.pair) {
      kids.push(h("div", { class: "pair" }, [
        h("div", { class: "chosen" }, [h("strong", { text: "chosen (" + num(item.pair.chosen_score) + ")" }), h("br"), item.pair.chosen]),
        h("div", { class: "rejected" }, [h("strong", { text: "rejected (" + num(item.pair.rejected_score) + ")" }), h("br"), item.pair.rejected]),
      ]));
    } else kids.push(h("p", { class: "muted small", text: "No pair: dropped (a tie, or fewer than two scored candidates)." }));
    kids.push(h("details", { open: item.pair ? null : "open" }, [h("summary", { text: item.candidates.length + " candidates with the judge's verdicts" }), candidateTable(item)]));
    return h("div", { class: "item", "data-prompt": item.prompt_id }, kids);
  }
  async function dataView(name, t) {
    crumbs([["runs", "/ui/"], [name, "/ui/runs/" + enc(name)], ["iteration " + t, "/ui/runs/" + enc(name) + "/iterations/" + t], ["data", null]]);
    const qs = new URLSearchParams(location.search);
    const params = new URLSearchParams();
    ["view", "offset", "q", "filter", "min_margin", "limit"].forEach(function (k) { if (qs.get(k)) params.set(k, qs.get(k)); });
    const page = await api(API + "/runs/" + enc(name) + "/iterations/" + t + "/data?" + params.toString());
    main.innerHTML = "";
    main.appendChild(h("h1", { text: "Data of iteration " + t }));
    const q = h("input", { name: "q", placeholder: "search text", value: qs.get("q") || "" });
    const view = h("select", { name: "view" }, [["pairs", "pairs"], ["prompts", "all prompts"]].map(function (o) { return h("option", { value: o[0], selected: (qs.get("view") || "pairs") === o[0] ? "selected" : null, text: o[1] }); }));
    const filter = h("select", { name: "filter" }, [["", "no filter"], ["dropped", "dropped (no pair, e.g. ties)"], ["parse_failures", "parse failures"]].map(function (o) { return h("option", { value: o[0], selected: (qs.get("filter") || "") === o[0] ? "selected" : null, text: o[1] }); }));
    const margin = h("input", { name: "min_margin", type: "number", step: "0.1", placeholder: "min margin", value: qs.get("min_margin") || "", style: "width:7rem" });
    main.appendChild(h("form", { class: "filters", id: "filters", onsubmit: function (ev) {
      ev.preventDefault();
      const p = new URLSearchParams();
      if (q.value) p.set("q", q.value);
      if (view.value !== "pairs" || filter.value === "dropped") p.set("view", filter.value === "dropped" ? "prompts" : view.value);
      if (filter.value) p.set("filter", filter.value);
      if (margin.value) p.set("min_margin", margin.value);
      location.search = p.toString();
    } }, [view, filter, margin, q, h("button", { type: "submit", text: "Apply" })]));
    if (page.missing) main.appendChild(h("p", { class: "muted", text: page.file + " is not written yet." }));
    const list = h("div", { id: "items" }, page.items.map(itemView));
    main.appendChild(list);
    if (!page.items.length && !page.missing) list.appendChild(h("p", { class: "muted", text: "Nothing matches." }));
    const pager = h("div", { class: "pager" }, [h("span", { class: "muted small", text: page.items.length + " shown from byte " + page.offset + " of " + page.size })]);
    if (page.offset > 0) pager.appendChild(h("a", { href: "?" + (function () { const p = new URLSearchParams(qs); p.delete("offset"); return p.toString(); })(), text: "first page" }));
    if (page.next_offset !== null && page.next_offset !== undefined) {
      const p = new URLSearchParams(qs); p.set("offset", page.next_offset);
      pager.appendChild(h("a", { href: "?" + p.toString(), id: "next", text: "next page ->" }));
    }
    main.appendChild(pager);
    const ev = await api(API + "/runs/" + enc(name) + "/iterations/" + t + "/eval?limit=" + enc(qs.get("eval_limit") || "10") + "&offset=" + enc(qs.get("eval_offset") || "0"));
    main.appendChild(h("h2", { text: "Evaluation examples" }));
    if (!ev.items.length) main.appendChild(h("p", { class: "muted", text: "No evaluation verdicts yet." }));
    ev.items.forEach(function (e) {
      const pref = e.preference === null || e.preference === undefined ? "failed" : e.preference > 0.5 ? e.a + " wins" : e.preference < 0.5 ? e.b + " wins" : "tie";
      main.appendChild(h("div", { class: "item eval-example", "data-prompt": e.prompt_id }, [
        h("div", { class: "prompt", text: e.instruction || e.prompt_id }),
        h("div", { class: "side" }, [h("div", {}, [h("strong", { text: "A: " + e.a }), h("br"), e.answer_a || ""]), h("div", {}, [h("strong", { text: "B: " + e.b }), h("br"), e.answer_b || ""])]),
        h("p", { class: "small" }, [h("strong", { text: pref }), " - A shown first: " + ((e.ab && e.ab.winner) || "?") + " (" + ((e.ab && e.ab.text) || "") + "); B shown first: " + ((e.ba && e.ba.winner) || "?") + " (" + ((e.ba && e.ba.text) || "") + ")"]),
      ]));
    });
    if (ev.next_offset !== null && ev.next_offset !== undefined) {
      const p = new URLSearchParams(qs); p.set("eval_offset", ev.next_offset);
      main.appendChild(h("div", { class: "pager" }, h("a", { href: "?" + p.toString(), id: "eval-next", text: "more evaluation examples ->" })));
    }
  }

  // ------------------------------------------------------------------ routing
  async function route() {
    try { info = await api(API + "/info"); } catch (e) { /* the info route is open */ }
    showToken();
    const path = location.pathname.replace(/\/+$/, "");
    let m;
    try {
      if ((m = path.match(/^\/ui\/runs\/([^/]+)\/iterations\/(\d+)\/data$/))) await dataView(decodeURIComponent(m[1]), Number(m[2]));
      else if ((m = path.match(/^\/ui\/runs\/([^/]+)\/iterations\/(\d+)$/))) await iterationView(decodeURIComponent(m[1]), Number(m[2]));
      else if ((m = path.match(/^\/ui\/runs\/([^/]+)$/))) await runView(decodeURIComponent(m[1]));
      else await runsView();
    } catch (e) { fail(e); }
  }
  route();
})();
