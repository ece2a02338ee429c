/* Small SVG charts for the dashboard (no library, no build step).
 * Charts.line(el, {title, series: [{name, points: [[x, y], ...], intervals: [[x, lo, hi], ...]}],
 *                  xLabel, yMin, yMax, xTicks: [[x, label], ...], percent})
 * Charts.bars(el, {title, labels: [...], series: [{name, values: [...]}], percent})
 */
(function () {
  "use strict";
  const NS = "http://www.w3.org/2000/svg";
  const COLORS = ["#0969da", "#cf222e", "#1a7f37", "#8250df", "#bf8700", "#0a7c86", "#e16f24", "#6e7781"];
  const W = 420, H = 230, L = 44, R = 12, T = 12, B = 34;

  function el(name, attrs, parent) {
    const e = document.createElementNS(NS, name);
    for (const k in attrs || {}) e.setAttribute(k, attrs[k]);
    if (parent) parent.appendChild(e);
    return e;
  }
  function text(parent, x, y, s, anchor) {
    const t = el("text", { x: x, y: y, "text-anchor": anchor || "middle" }, parent);
    t.textContent = s;
    return t;
  }
  function fmt(v, percent) {
    if (v === null || v === undefined || !isFinite(v)) return "n/a";
    if (percent) return (100 * v).toFixed(0) + "%";
    if (Number.isInteger(v)) return String(v);
    const a = Math.abs(v);
    return a >= 1000 ? v.toFixed(0) : a >= 10 ? v.toFixed(1) : a >= 1 ? v.toFixed(2) : v.toPrecision(2);
  }
  function niceRange(lo, hi) {
    if (lo === hi) { lo -= lo === 0 ? 1 : Math.abs(lo) * 0.1; hi += hi === 0 ? 1 : Math.abs(hi) * 0.1; }
    const pad = (hi - lo) * 0.06;
    return [lo - pad, hi + pad];
  }
  function frame(container, opts) {
    const box = document.createElement("div");
    box.className = "chart-box";
    if (opts.title) { const h = document.createElement("h3"); h.textContent = opts.title; box.appendChild(h); }
    const svg = el("svg", { viewBox: "0 0 " + W + " " + H, class: "chart", role: "img" });
    if (opts.title) el("title", {}, svg).textContent = opts.title;
    box.appendChild(svg);
    container.appendChild(box);
    return { box: box, svg: svg };
  }
  function legend(box, names) {
    const lg = document.createElement("div");
    lg.className = "legend";
    names.forEach(function (n, i) {
      const s = document.createElement("span");
      const sw = document.createElement("i");
      sw.style.background = COLORS[i % COLORS.length];
      s.appendChild(sw);
      s.appendChild(document.createTextNode(n));
      lg.appendChild(s);
    });
    box.appendChild(lg);
  }
  function axes(svg, xs, ys, opts) {
    const sx = function (x) { return L + (xs[1] === xs[0] ? 0.5 : (x - xs[0]) / (xs[1] - xs[0])) * (W - L - R); };
    const sy = function (y) { return H - B - (y - ys[0]) / (ys[1] - ys[0]) * (H - T - B); };
    for (let i = 0; i <= 4; i++) {
      const v = ys[0] + (ys[1] - ys[0]) * i / 4;
      el("line", { x1: L, x2: W - R, y1: sy(v), y2: sy(v), class: "grid" }, svg);
      text(svg, L - 4, sy(v) + 3, fmt(v, opts.percent), "end");
    }
    el("line", { x1: L, x2: W - R, y1: H - B, y2: H - B, class: "axis" }, svg);
    el("line", { x1: L, x2: L, y1: T, y2: H - B, class: "axis" }, svg);
    if (opts.xLabel) text(svg, (L + W - R) / 2, H - 4, opts.xLabel);
    return { sx: sx, sy: sy };
  }

  function line(container, opts) {
    const series = (opts.series || []).filter(function (s) { return s.points && s.points.length; });
    const f = frame(container, opts);
    if (!series.length) { text(f.svg, W / 2, H / 2, "no data yet"); return f.svg; }
    let xlo = Infinity, xhi = -Infinity, ylo = Infinity, yhi = -Infinity;
    series.forEach(function (s) {
      s.points.forEach(function (p) {
        if (p[1] === null || p[1] === undefined) return;
        xlo = Math.min(xlo, p[0]); xhi = Math.max(xhi, p[0]); ylo = Math.min(ylo, p[1]); yhi = Math.max(yhi, p[1]);
      });
      (s.intervals || []).forEach(function (iv) { ylo = Math.min(ylo, iv[1]); yhi = Math.max(yhi, iv[2]); });
    });
    if (opts.yMin !== undefined) ylo = Math.min(ylo, opts.yMin);
    if (opts.yMax !== undefined) yhi = Math.max(yhi, opts.yMax);
    let ys = (opts.yMin !== undefined && opts.yMax !== undefined) ? [ylo, yhi] : niceRange(ylo, yhi);
    if (opts.yMin !== undefined && opts.yMax === undefined) ys = [opts.yMin, ys[1]];
    const a = axes(f.svg, [xlo, xhi], ys, opts);
    const ticks = opts.xTicks || [];
    if (ticks.length) ticks.forEach(function (t) { text(f.svg, a.sx(t[0]), H - B + 12, t[1]); });
    else { text(f.svg, a.sx(xlo), H - B + 12, fmt(xlo)); if (xhi !== xlo) text(f.svg, a.sx(xhi), H - B + 12, fmt(xhi)); }
    if (opts.ref !== undefined) {
      el("line", { x1: L, x2: W - R, y1: a.sy(opts.ref), y2: a.sy(opts.ref), stroke: "#999",
        "stroke-dasharray": "4 3" }, f.svg);
    }
    series.forEach(function (s, i) {
      const color = COLORS[i % COLORS.length];
      const g = el("g", { class: "series", "data-name": s.name }, f.svg);
      (s.intervals || []).forEach(function (iv) {
        el("line", { x1: a.sx(iv[0]), x2: a.sx(iv[0]), y1: a.sy(iv[1]), y2: a.sy(iv[2]), stroke: color,
          "stroke-width": 2, opacity: 0.45, class: "interval" }, g);
      });
      const pts = s.points.filter(function (p) { return p[1] !== null && p[1] !== undefined; });
      if (pts.length > 1) {
        el("polyline", { points: pts.map(function (p) { return a.sx(p[0]) + "," + a.sy(p[1]); }).join(" "),
          fill: "none", stroke: color, "stroke-width": 1.8 }, g);
      }
      pts.forEach(function (p) {
        const c = el("circle", { cx: a.sx(p[0]), cy: a.sy(p[1]), r: pts.length > 40 ? 1.6 : 3, fill: color,
          class: "point" }, g);
        el("title", {}, c).textContent = s.name + ": " + fmt(p[1], opts.percent) + " at " + p[0];
      });
    });
    legend(f.box, series.map(function (s) { return s.name; }));
    return f.svg;
  }

  function bars(container, opts) {
    const f = frame(container, opts);
    const labels = opts.labels || [];
    const series = opts.series || [];
    if (!labels.length || !series.length) { text(f.svg, W / 2, H / 2, "no data yet"); return f.svg; }
    let hi = 0;
    series.forEach(function (s) { s.values.forEach(function (v) { if (v) hi = Math.max(hi, v); }); });
    const a = axes(f.svg, [0, 1], [0, hi > 0 ? hi * 1.08 : 1], opts);
    const slot = (W - L - R) / labels.length;
    const bw = Math.max(2, slot * 0.8 / series.length);
    labels.forEach(function (lab, j) {
      text(f.svg, L + slot * (j + 0.5), H - B + 12, lab);
      series.forEach(function (s, i) {
        const v = s.values[j] || 0;
        const r = el("rect", { x: L + slot * j + slot * 0.1 + bw * i, y: a.sy(v), width: bw, height: H - B - a.sy(v),
          fill: COLORS[i % COLORS.length], class: "bar-rect" }, f.svg);
        el("title", {}, r).textContent = s.name + " " + lab + ": " + fmt(v, opts.percent);
      });
    });
    legend(f.box, series.map(function (s) { return s.name; }));
    return f.svg;
  }

  window.Charts = { line: line, bars: bars, fmt: fmt };
})();
