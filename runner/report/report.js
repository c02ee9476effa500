(function () {
  "use strict";
  var DATA = JSON.parse(document.getElementById("report-data").textContent);
  var NS = "http://www.w3.org/2000/svg", WIDTH = 560, HEIGHT = 320, M = {l: 58, r: 16, t: 12, b: 40};

  function el(tag, attrs, parent, text) {
    var node = document.createElementNS(NS, tag);
    for (var k in attrs) node.setAttribute(k, attrs[k]);
    if (text !== undefined) node.textContent = text;
    if (parent) parent.appendChild(node);
    return node;
  }
  function fmt(x) {
    var a = Math.abs(x);
    if (a >= 1e9) return (x / 1e9).toFixed(1) + "G";
    if (a >= 1e6) return (x / 1e6).toFixed(1) + "M";
    if (a >= 1e4) return (x / 1e3).toFixed(0) + "k";
    if (a >= 1e3) return (x / 1e3).toFixed(1) + "k";
    if (a >= 100 || a === 0) return x.toFixed(0);
    if (a >= 10) return x.toFixed(1);
    return x.toFixed(a >= 1 ? 2 : 3);
  }
  function fmtBytes(x) {
    var units = [["GiB", 1073741824], ["MiB", 1048576], ["KiB", 1024]];
    for (var i = 0; i < units.length; i++) if (x >= units[i][1]) return (x / units[i][1]).toFixed(1) + " " + units[i][0];
    return x.toFixed(0) + " B";
  }
  function ticks(lo, hi, n) {
    var span = hi - lo || Math.abs(hi) || 1, step = Math.pow(10, Math.floor(Math.log10(span / n)));
    var err = n / span * step;
    if (err <= 0.15) step *= 10; else if (err <= 0.35) step *= 5; else if (err <= 0.75) step *= 2;
    var out = [];
    for (var v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) out.push(+v.toFixed(12));
    out.step = step;
    return out;
  }
  // Tick labels with as many decimals as the tick step needs (0.01 → "5.62", 50 → "350", 500 → "1.5k").
  function tickLabel(t, step) {
    var big = Math.max(Math.abs(step), Math.abs(t));
    var scale = big >= 1e12 ? [1e12, "T"] : big >= 1e9 ? [1e9, "G"] : Math.abs(step) >= 1e6 || Math.abs(t) >= 1e6 ? [1e6, "M"] : Math.abs(step) >= 100 && Math.abs(t) >= 1e3 ? [1e3, "k"] : [1, ""];
    var digits = Math.max(0, -Math.floor(Math.log10(step / scale[0]) + 1e-9));
    return (t / scale[0]).toFixed(Math.min(digits, 6)) + scale[1];
  }
  function extent(values, pad) {
    var lo = Math.min.apply(null, values), hi = Math.max.apply(null, values);
    if (lo === hi) { lo -= Math.abs(lo) * 0.05 || 1; hi += Math.abs(hi) * 0.05 || 1; }
    var p = (hi - lo) * pad;
    return [lo - p, hi + p];
  }
  // Axes and grid for numeric x and y; returns scales and the plot group.
  function frame(fig, xd, yd, xLabel, yLabel, size) {
    var W = (size || [WIDTH, HEIGHT])[0], H = (size || [WIDTH, HEIGHT])[1];
    var svg = el("svg", {viewBox: "0 0 " + W + " " + H, role: "img"});
    fig.appendChild(svg);
    var x = function (v) { return M.l + (v - xd[0]) / (xd[1] - xd[0]) * (W - M.l - M.r); };
    var y = function (v) { return H - M.b - (v - yd[0]) / (yd[1] - yd[0]) * (H - M.t - M.b); };
    var grid = el("g", {"class": "grid"}, svg), axis = el("g", {"class": "axis"}, svg);
    var xt = ticks(xd[0], xd[1], 6), yt = ticks(yd[0], yd[1], 5);
    xt.forEach(function (t) {
      el("line", {x1: x(t), x2: x(t), y1: M.t, y2: H - M.b}, grid);
      el("text", {x: x(t), y: H - M.b + 15, "text-anchor": "middle"}, axis, tickLabel(t, xt.step));
    });
    yt.forEach(function (t) {
      el("line", {x1: M.l, x2: W - M.r, y1: y(t), y2: y(t)}, grid);
      el("text", {x: M.l - 6, y: y(t) + 4, "text-anchor": "end"}, axis, tickLabel(t, yt.step));
    });
    el("path", {d: "M" + M.l + "," + M.t + "V" + (H - M.b) + "H" + (W - M.r), fill: "none"}, axis);
    el("text", {x: (M.l + W - M.r) / 2, y: H - 6, "text-anchor": "middle"}, axis, xLabel);
    el("text", {x: 14, y: (M.t + H - M.b) / 2, "text-anchor": "middle",
                transform: "rotate(-90 14 " + (M.t + H - M.b) / 2 + ")"}, axis, yLabel);
    return {svg: svg, x: x, y: y, plot: el("g", {"class": "plot"}, svg)};
  }
  // A variant's short name (the choices that vary among the compared runs) and its whole description.
  function short(label) { return (DATA.variants[label] || {}).short || label; }
  // Widen the viewBox to everything drawn, so that no label is clipped whatever its length.
  function fit(svg) {
    var b = svg.getBBox(), v = svg.viewBox.baseVal, x0 = Math.min(v.x, b.x - 2), y0 = Math.min(v.y, b.y - 2);
    var x1 = Math.max(v.x + v.width, b.x + b.width + 2), y1 = Math.max(v.y + v.height, b.y + b.height + 2);
    svg.setAttribute("viewBox", [x0, y0, x1 - x0, y1 - y0].join(" "));
  }
  function textWidth(svg, text) {
    var t = el("text", {x: 0, y: 0}, svg, text), w = t.getComputedTextLength();
    svg.removeChild(t);
    return w;
  }
  // Legend entries toggle every SVG element tagged with their variant.
  function legend(fig, svg, labels) {
    var box = document.createElement("div");
    box.className = "legend";
    labels.forEach(function (label) {
      var item = document.createElement("span");
      item.innerHTML = '<i class="swatch"></i>';
      item.firstChild.style.background = DATA.colors[label];
      item.title = (DATA.variants[label] || {}).title || label;
      item.setAttribute("data-variant", label);
      item.appendChild(document.createTextNode(short(label)));
      item.addEventListener("click", function () {
        var off = item.classList.toggle("off");
        svg.querySelectorAll("[data-variant]").forEach(function (node) {
          if (node.getAttribute("data-variant") === label) node.style.display = off ? "none" : "";
        });
      });
      box.appendChild(item);
    });
    fig.appendChild(box);
  }
  function empty(fig, message) {
    var p = document.createElement("div");
    p.className = "empty";
    p.textContent = message;
    fig.appendChild(p);
    fig.setAttribute("data-rendered", "empty");
  }
  function unique(list) { return list.filter(function (v, i) { return list.indexOf(v) === i; }); }

  // Loss curves against training tokens, or (buttons from data-axes) analytic training FLOPs or seconds.
  var XAXES = {tokens: "training tokens", flops: "training FLOPs (analytic)", seconds: "training seconds"};
  function xValue(p, run, axis) {
    if (axis === "flops") return p.tokens !== null && p.tokens !== undefined && run.flops_per_token ? p.tokens * run.flops_per_token : null;
    if (axis === "seconds") return p.seconds !== undefined ? p.seconds : null;
    return p.tokens !== null && p.tokens !== undefined ? p.tokens : p.step;
  }
  function curves(fig, axis) {
    var kind = fig.getAttribute("data-kind"), series = [], axes = (fig.getAttribute("data-axes") || "").split(" ");
    var field = fig.getAttribute("data-field") || "loss";  // telemetry charts draw another field of the points
    axis = axis || "tokens";
    if (axes.length > 1 && !fig.querySelector(".axis-buttons")) {
      var bar = document.createElement("div");
      bar.className = "axis-buttons";
      axes.forEach(function (a) {
        var b = document.createElement("button");
        b.textContent = a;
        b.setAttribute("data-axis", a);
        b.addEventListener("click", function () {
          fig.querySelectorAll("svg, .legend, .empty").forEach(function (n) { n.remove(); });
          curves(fig, a);
          fig.querySelectorAll("svg").forEach(fit);
        });
        bar.appendChild(b);
      });
      fig.insertBefore(bar, fig.firstChild);
    }
    fig.querySelectorAll(".axis-buttons button").forEach(function (b) { b.classList.toggle("on", b.getAttribute("data-axis") === axis); });
    DATA.runs.forEach(function (r) {
      var pts = ((r.curves || {})[kind] || []).filter(function (p) {
        return p[field] !== null && p[field] !== undefined && xValue(p, r, axis) !== null; });
      if (pts.length) series.push({run: r, pts: pts.map(function (p) { return [xValue(p, r, axis), p[field], p.step]; })});
    });
    if (!series.length) return empty(fig, "no " + kind + " curves recorded against " + XAXES[axis]);
    var xs = [], ys = [];
    series.forEach(function (s) { s.pts.forEach(function (p) { xs.push(p[0]); ys.push(p[1]); }); });
    var f = frame(fig, [Math.min(0, Math.min.apply(null, xs)), Math.max.apply(null, xs)], extent(ys, 0.06),
                  XAXES[axis], fig.getAttribute("data-ylabel") || (kind === "val" ? "validation loss" : "training loss"));
    series.forEach(function (s) {
      var color = DATA.colors[s.run.variant_label], g = el("g", {"data-variant": s.run.variant_label}, f.plot);
      var d = s.pts.map(function (p, i) { return (i ? "L" : "M") + f.x(p[0]).toFixed(1) + "," + f.y(p[1]).toFixed(1); }).join("");
      var line = el("path", {d: d, fill: "none", stroke: color, "stroke-width": 1.8, "class": "series",
                             "stroke-dasharray": s.run.status === "ok" ? "" : "4 3"}, g);
      el("title", {}, line, s.run.short + " (" + s.run.status + ")");
      if (s.pts.length <= 30) s.pts.forEach(function (p) {
        var c = el("circle", {cx: f.x(p[0]), cy: f.y(p[1]), r: 2.6, fill: color}, g);
        el("title", {}, c, s.run.short + "\nstep " + p[2] + " · " + fmt(p[0]) + " " + axis + " · " + field + " " + p[1].toFixed(4));
      });
    });
    legend(fig, f.svg, unique(series.map(function (s) { return s.run.variant_label; })));
    fig.setAttribute("data-rendered", "true");
  }

  // Validation loss against the chosen cost (DATA.cost): the compared runs, each variant at its best lr.
  function pareto(fig) {
    var key = DATA.cost.key;
    var runs = DATA.runs.filter(function (r) { return r.status === "ok" && !r.left_out && r.val_loss !== null && r[key] !== null && r[key] !== undefined; });
    if (!runs.length) return empty(fig, "no compared run has both a validation loss and " + DATA.cost.label);
    var f = frame(fig, extent(runs.map(function (r) { return r[key]; }), 0.08),
                  extent(runs.map(function (r) { return r.val_loss; }), 0.08), DATA.cost.label, "validation loss",
                  [620, 360]);
    var front = runs.filter(function (r) { return r.pareto; }).sort(function (a, b) { return a[key] - b[key]; });
    el("path", {d: front.map(function (r, i) { return (i ? "L" : "M") + f.x(r[key]) + "," + f.y(r.val_loss); }).join(""),
                fill: "none", stroke: "#333", "stroke-width": 1.2, "stroke-dasharray": "5 4", "class": "front-line"}, f.plot);
    runs.forEach(function (r) {
      var c = el("circle", {cx: f.x(r[key]), cy: f.y(r.val_loss), r: r.pareto ? 6 : 4.5, "class": "point",
                            fill: DATA.colors[r.variant_label], stroke: r.pareto ? "#111" : "#fff", "stroke-width": r.pareto ? 1.8 : 1,
                            "data-variant": r.variant_label}, f.plot);
      el("title", {}, c, r.short + "\nloss " + r.val_loss.toFixed(4) + " · " + fmt(r[key]) + " " + DATA.cost.label + (r.pareto ? "\nPareto front" : ""));
    });
    legend(fig, f.svg, unique(runs.map(function (r) { return r.variant_label; })));
    fig.setAttribute("data-rendered", "true");
  }

  function bars(fig) {
    // mean per variant; a variant's measured values win over values computed from its config
    var key = fig.getAttribute("data-key"), sums = {}, counts = {}, est = {}, order = [], W = WIDTH;
    DATA.runs.forEach(function (r) {
      if (r[key] === null || r[key] === undefined) return;
      var v = r.variant_label, estimated = key === "kv_cache_bytes_per_token" && !!r.kv_estimated;
      if (!(v in sums)) { order.push(v); est[v] = true; }
      if (est[v] && !estimated) { sums[v] = 0; counts[v] = 0; est[v] = false; }
      if (est[v] !== estimated) return;
      sums[v] = (sums[v] || 0) + r[key]; counts[v] = (counts[v] || 0) + 1;
    });
    if (!order.length) return empty(fig, "not measured (runs without a benchmark: train.bench=false)");
    var rowH = 26, h = M.t + rowH * order.length + 8, max = 0;
    order.forEach(function (v) { max = Math.max(max, sums[v] / counts[v]); });
    var svg = el("svg", {viewBox: "0 0 " + W + " " + h, role: "img"});
    fig.appendChild(svg);
    // the labels' column is as wide as the longest short name (at most half the chart), the values' 90 units
    var labelW = Math.min(W / 2, 16 + Math.max.apply(null, order.map(function (v) { return textWidth(svg, short(v)); })));
    var defs = el("defs", {}, svg), pat = el("pattern", {id: "hatch-" + key, width: 6, height: 6,
      patternUnits: "userSpaceOnUse", patternTransform: "rotate(45)"}, defs);
    el("rect", {width: 6, height: 6, fill: "#fff", "fill-opacity": 0.0}, pat);
    el("line", {x1: 0, y1: 0, x2: 0, y2: 6, stroke: "#fff", "stroke-width": 2, "stroke-opacity": 0.55}, pat);
    order.forEach(function (v, i) {
      var value = sums[v] / counts[v], y = M.t + i * rowH, w = (W - labelW - 90) * value / (max || 1);
      var g = el("g", {"class": "bar", "data-variant": v}, svg);
      var name = short(v), fits = textWidth(svg, name) <= labelW - 10;
      var text = el("text", {x: labelW - 8, y: y + rowH / 2 + 4, "text-anchor": "end"}, g, fits ? name : name.slice(0, Math.floor(name.length * (labelW - 10) / textWidth(svg, name)) - 1) + "…");
      el("title", {}, text, (DATA.variants[v] || {}).title || v);
      var rect = el("rect", {x: labelW, y: y + 4, width: Math.max(w, 1), height: rowH - 8, rx: 2, fill: DATA.colors[v]}, g);
      if (est[v]) el("rect", {x: labelW, y: y + 4, width: Math.max(w, 1), height: rowH - 8, fill: "url(#hatch-" + key + ")"}, g);
      el("title", {}, rect, name + ": " + fmtBytes(value) + (est[v] ? " (counted by the model)" : ""));
      el("text", {x: labelW + w + 6, y: y + rowH / 2 + 4}, g, fmtBytes(value) + (est[v] ? "*" : ""));
    });
    fig.setAttribute("data-rendered", "true");
  }

  // Forest plot: each choice's mean validation loss with its 95% interval across seeds.
  function effect(fig) {
    var fam = DATA.effects[+fig.getAttribute("data-index")], cs = fam.choices;
    var values = [];
    cs.forEach(function (c) { values.push(c.val_loss); if (c.val_loss_lo !== null) values.push(c.val_loss_lo, c.val_loss_hi); });
    var W = 380, rowH = 26, labelW = 110, h = M.t + rowH * cs.length + 40, d = extent(values, 0.1);
    var svg = el("svg", {viewBox: "0 0 " + W + " " + h, role: "img"});
    fig.appendChild(svg);
    var x = function (v) { return labelW + (v - d[0]) / (d[1] - d[0]) * (W - labelW - 20); };
    var axis = el("g", {"class": "axis"}, svg), grid = el("g", {"class": "grid"}, svg);
    var dt = ticks(d[0], d[1], 5);
    dt.forEach(function (t) {
      el("line", {x1: x(t), x2: x(t), y1: M.t, y2: h - 32}, grid);
      el("text", {x: x(t), y: h - 18, "text-anchor": "middle"}, axis, tickLabel(t, dt.step));
    });
    cs.forEach(function (c, i) {
      var y = M.t + i * rowH + rowH / 2, g = el("g", {"class": "effect-row"}, svg), name = String(c.choice === null ? "–" : c.choice);
      el("text", {x: labelW - 8, y: y + 4, "text-anchor": "end"}, g, name.length > 18 ? name.slice(0, 17) + "…" : name);
      if (c.val_loss_lo !== null) {
        el("line", {x1: x(c.val_loss_lo), x2: x(c.val_loss_hi), y1: y, y2: y, stroke: "#888", "stroke-width": 1.5}, g);
        [c.val_loss_lo, c.val_loss_hi].forEach(function (v) { el("line", {x1: x(v), x2: x(v), y1: y - 5, y2: y + 5, stroke: "#888"}, g); });
      }
      var dot = el("circle", {cx: x(c.val_loss), cy: y, r: 5, fill: i === 0 ? "#59a14f" : "#4e79a7"}, g);
      el("title", {}, dot, name + ": loss " + c.val_loss.toFixed(4) + (c.val_loss_lo !== null ? " [" + c.val_loss_lo.toFixed(4) + ", " +
         c.val_loss_hi.toFixed(4) + "]" : "") + " · " + c.runs + " runs, " + c.seeds + " seeds");
    });
    el("text", {x: (labelW + W) / 2, y: h - 3, "text-anchor": "middle"}, axis, "validation loss");
    fig.setAttribute("data-rendered", "true");
  }

  // Sortable tables: click a heading; numbers sort numerically, blanks last.
  function sortable(table) {
    var heads = table.querySelectorAll("thead th");
    heads.forEach(function (th, col) {
      th.addEventListener("click", function () {
        var asc = th.getAttribute("aria-sort") !== "ascending", num = th.getAttribute("data-type") === "num";
        heads.forEach(function (h) { h.removeAttribute("aria-sort"); });
        th.setAttribute("aria-sort", asc ? "ascending" : "descending");
        var body = table.tBodies[0], rows = Array.prototype.slice.call(body.rows);
        var key = function (row) {
          var cell = row.cells[col], v = cell.hasAttribute("data-v") ? cell.getAttribute("data-v") : cell.textContent.trim();
          return num ? (v === "" ? null : parseFloat(v)) : (v === "–" ? null : v.toLowerCase());
        };
        rows.sort(function (a, b) {
          var ka = key(a), kb = key(b);
          if (ka === null || kb === null) return ka === kb ? 0 : ka === null ? 1 : -1;
          var c = num ? ka - kb : ka.localeCompare(kb, undefined, {numeric: true});
          return asc ? c : -c;
        });
        rows.forEach(function (row) { body.appendChild(row); });
      });
    });
  }

  // One drawing function per chart kind (a figure with data-chart=KIND); DATA.runs holds the compared runs only.
  // Every chart's svg is fitted to what it drew, so that no label is clipped.
  var draw = {curves: curves, pareto: pareto, bars: bars, effect: effect};
  document.querySelectorAll("figure[data-chart]").forEach(function (fig) {
    draw[fig.getAttribute("data-chart")](fig);
    fig.querySelectorAll("svg").forEach(fit);
  });
  document.querySelectorAll("table.sortable").forEach(sortable);
  document.documentElement.setAttribute("data-ready", "true");
})();
