// fly's timeline: one lane per worker, one bar per attempt at a test, drawn on a <canvas> from
// the compact data `report::html::data_json` writes (see html.rs for its shape). Shared by the
// static HTML report (drawn once) and the live dashboard (redrawn as new data arrives).
//
// flyTimeline(canvas, box, tip) returns { set: function (data) }. After each drawing the canvas
// carries what it shows as attributes (data-lanes, data-bars, data-drawn) and the box gets one
// hidden .lane-label element per lane, so a page (and a test driving it in a browser) can read
// what was drawn.
function flyTimeline(canvas, box, tip) {
  "use strict";
  var COLORS = { passed: "#2e9e44", failed: "#d62828", error: "#b4480c", skipped: "#9aa0a6",
    xfailed: "#e0b000", xpassed: "#7cc47f", running: "#4c8bd6" };
  var ctx = canvas.getContext("2d");
  var LABEL_W = 190, AXIS_H = 24, HEAD_H = 18, LANE_H = 14, LANE_GAP = 2;
  var D = null, colorOf = [], running = -1, rows = [], totalH = AXIS_H + 6, wall = 1;
  var view = { t0: 0, t1: 1 }, zoomed = false;
  var labels = document.createElement("div");
  labels.className = "lane-labels";
  labels.hidden = true;
  box.appendChild(labels);

  // Rows: an agent header, then its lanes. Bars per lane as typed arrays for fast culling.
  function build(data) {
    D = data;
    colorOf = D.names.map(function (n) { return COLORS[n] || "#6b5bd2"; });
    running = D.names.indexOf("running");
    rows = [];
    var y = AXIS_H, lastAgent = -1;
    D.lanes.forEach(function (lane, li) {
      if (lane.agent !== lastAgent) {
        var agent = D.agents[lane.agent] || { label: "?" };
        rows.push({ head: true, y: y, h: HEAD_H, label: agent.label });
        y += HEAD_H; lastAgent = lane.agent;
      }
      var n = lane.bars.length, starts = new Float64Array(n), ends = new Float64Array(n);
      var maxEnd = 0, prefixMax = new Float64Array(n);
      for (var b = 0; b < n; b++) {
        var bar = lane.bars[b], s = Infinity, e = -Infinity;
        for (var k = 3; k + 4 < bar.length; k += 5) {
          s = Math.min(s, bar[k + 1]); e = Math.max(e, bar[k + 1] + bar[k + 2]);
        }
        if (s === Infinity) { s = 0; e = 0; }
        starts[b] = s; ends[b] = e; maxEnd = Math.max(maxEnd, e); prefixMax[b] = maxEnd;
      }
      rows.push({ head: false, y: y, h: LANE_H, lane: lane, index: li, starts: starts, ends: ends,
        prefixMax: prefixMax, label: "w" + lane.worker + "  " + (lane.utilization * 100).toFixed(1) + "%" });
      y += LANE_H + LANE_GAP;
    });
    totalH = y + 6;
    wall = Math.max(D.wall_us, 1);
    // A live timeline grows: follow it unless the user zoomed or panned.
    if (!zoomed) { view.t0 = 0; view.t1 = wall; }
  }

  function width() { return box.clientWidth; }
  function plotW() { return Math.max(width() - LABEL_W - 8, 50); }
  function xOf(t) { return LABEL_W + (t - view.t0) / (view.t1 - view.t0) * plotW(); }
  function tOf(x) { return view.t0 + (x - LABEL_W) / plotW() * (view.t1 - view.t0); }

  function fmt(us) {
    var s = us / 1e6, a = Math.abs(s);
    if (a < 0.001) return (us).toFixed(0) + "us";
    if (a < 1) return (s * 1000).toFixed(a < 0.01 ? 2 : 1) + "ms";
    if (a < 60) return s.toFixed(a < 10 ? 3 : 2) + "s";
    return Math.floor(s / 60) + "m" + ("0" + (s % 60).toFixed(1)).slice(-4) + "s";
  }

  function resize() {
    var dpr = window.devicePixelRatio || 1;
    canvas.style.height = totalH + "px";
    canvas.width = Math.round(width() * dpr);
    canvas.height = Math.round(totalH * dpr);
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    draw();
  }

  // First bar whose end may reach t: prefixMax is non-decreasing.
  function firstVisible(row, t) {
    var lo = 0, hi = row.prefixMax.length;
    while (lo < hi) { var mid = (lo + hi) >> 1; if (row.prefixMax[mid] < t) lo = mid + 1; else hi = mid; }
    return lo;
  }

  function drawAxis() {
    var span = view.t1 - view.t0, target = plotW() / 110;
    var raw = span / Math.max(target, 1), p = Math.pow(10, Math.floor(Math.log10(raw)));
    var step = [1, 2, 5, 10].map(function (m) { return m * p; }).find(function (s) { return s >= raw; }) || raw;
    ctx.fillStyle = "#5f6b76"; ctx.strokeStyle = "#e6eaee"; ctx.font = "11px system-ui, sans-serif";
    ctx.textBaseline = "middle";
    for (var t = Math.ceil(view.t0 / step) * step; t <= view.t1; t += step) {
      var x = Math.round(xOf(t)) + 0.5;
      ctx.beginPath(); ctx.moveTo(x, AXIS_H - 4); ctx.lineTo(x, totalH); ctx.stroke();
      ctx.fillText(fmt(t), x + 3, AXIS_H / 2);
    }
  }

  function drawLane(row) {
    var bars = row.lane.bars;
    var top = row.y, h = row.h, i = firstVisible(row, view.t0);
    // Adjacent same-coloured segments are merged into one rectangle: zoomed out, a lane of
    // thousands of short tests costs a handful of fillRect calls.
    var runColor = null, runAlpha = 1, runX0 = 0, runX1 = 0;
    function flush() {
      if (runColor !== null) {
        ctx.globalAlpha = runAlpha; ctx.fillStyle = runColor;
        ctx.fillRect(runX0, top, Math.max(runX1 - runX0, 0.6), h);
      }
      runColor = null;
    }
    function seg(color, alpha, x0, x1) {
      if (x1 < LABEL_W || x0 > LABEL_W + plotW()) return;
      x0 = Math.max(x0, LABEL_W); x1 = Math.min(x1, LABEL_W + plotW());
      if (runColor === color && runAlpha === alpha && x0 <= runX1 + 0.75) { runX1 = Math.max(runX1, x1); return; }
      flush(); runColor = color; runAlpha = alpha; runX0 = x0; runX1 = x1;
    }
    for (; i < bars.length; i++) {
      if (row.starts[i] > view.t1) break;
      var bar = bars[i], color = colorOf[bar[1]] || "#6b5bd2", faded = bar[2] === 1;
      var x0 = xOf(row.starts[i]), x1 = xOf(row.ends[i]);
      if ((x1 - x0) < 4) { seg(color, faded ? 0.3 : 1, x0, x1); continue; }
      for (var k = 3; k + 4 < bar.length; k += 5) {
        // Setup and teardown lighter than the call; a test running now is drawn solid.
        var a = bar[k] === 1 || bar[1] === running ? 1 : 0.55;
        seg(color, faded ? a * 0.35 : a, xOf(bar[k + 1]), xOf(bar[k + 1] + bar[k + 2]));
      }
      // A thin gap between tests keeps neighbours apart when there is room.
      if (x1 - x0 > 6) { flush(); }
    }
    flush();
    ctx.globalAlpha = 1;
  }

  function draw() {
    var w = width();
    ctx.clearRect(0, 0, w, totalH);
    if (!D) return;
    drawAxis();
    ctx.textBaseline = "middle";
    rows.forEach(function (row) {
      if (row.head) {
        ctx.fillStyle = "#eef1f4"; ctx.fillRect(0, row.y, w, row.h);
        ctx.fillStyle = "#1d232a"; ctx.font = "600 12px system-ui, sans-serif";
        ctx.fillText(row.label, 6, row.y + row.h / 2);
        return;
      }
      ctx.fillStyle = "#fafbfc"; ctx.fillRect(LABEL_W, row.y, plotW(), row.h);
      drawLane(row);
      ctx.fillStyle = "#5f6b76"; ctx.font = "11px ui-monospace, Menlo, monospace";
      ctx.fillText(row.label, 14, row.y + row.h / 2);
    });
  }

  // What was drawn, readable without pixels.
  function publish() {
    var bars = 0;
    D.lanes.forEach(function (lane) { bars += lane.bars.length; });
    canvas.setAttribute("data-lanes", String(D.lanes.length));
    canvas.setAttribute("data-bars", String(bars));
    canvas.setAttribute("data-drawn", "1");
    labels.textContent = "";
    rows.forEach(function (row) {
      if (row.head) return;
      var agent = D.agents[row.lane.agent] || { label: "?" };
      var label = document.createElement("span");
      label.className = "lane-label";
      label.setAttribute("data-bars", String(row.lane.bars.length));
      label.textContent = agent.label + " / w" + row.lane.worker;
      labels.appendChild(label);
    });
  }

  function hit(mx, my) {
    var row = null;
    for (var r = 0; r < rows.length; r++) {
      if (!rows[r].head && my >= rows[r].y && my < rows[r].y + rows[r].h + LANE_GAP) { row = rows[r]; break; }
    }
    if (!row || mx < LABEL_W) return null;
    var t = tOf(mx), slack = 3 * (view.t1 - view.t0) / plotW();
    var i = firstVisible(row, t - slack), best = -1, bestD = Infinity;
    for (; i < row.starts.length && row.starts[i] <= t + slack; i++) {
      var d = t < row.starts[i] ? row.starts[i] - t : (t > row.ends[i] ? t - row.ends[i] : 0);
      if (d < bestD) { bestD = d; best = i; }
    }
    return best >= 0 && bestD <= slack ? { row: row, bar: row.lane.bars[best] } : null;
  }

  function describe(h) {
    var bar = h.bar, agent = D.agents[h.row.lane.agent] || { label: "?" };
    var lines = [D.tests[bar[0]] || ("test #" + bar[0]),
      "outcome: " + D.names[bar[1]] + (bar[2] === 1 ? " (superseded attempt)" : ""),
      "worker: " + agent.label + " / w" + h.row.lane.worker];
    var total = 0;
    for (var k = 3; k + 4 < bar.length; k += 5) {
      total += bar[k + 3];
      var cat = bar[k + 4] >= 0 ? D.names[bar[k + 4]] : "";
      lines.push(("        " + D.phases[bar[k]]).slice(-8) + ": " + fmt(bar[k + 3]) +
        "  at +" + fmt(bar[k + 1]) + (cat ? "  " + cat : ""));
    }
    lines.push("   total: " + fmt(total));
    return lines.join("\n");
  }

  var drag = null;
  canvas.addEventListener("mousedown", function (e) {
    drag = { x: e.clientX, t0: view.t0, t1: view.t1 }; canvas.classList.add("dragging");
  });
  window.addEventListener("mouseup", function () { drag = null; canvas.classList.remove("dragging"); });
  canvas.addEventListener("mousemove", function (e) {
    if (!D) return;
    var rect = canvas.getBoundingClientRect(), mx = e.clientX - rect.left, my = e.clientY - rect.top;
    if (drag) {
      var dt = (e.clientX - drag.x) / plotW() * (drag.t1 - drag.t0);
      if (dt !== 0) zoomed = true;
      view.t0 = drag.t0 - dt; view.t1 = drag.t1 - dt; tip.hidden = true; draw(); return;
    }
    var h = hit(mx, my);
    if (!h) { tip.hidden = true; return; }
    tip.textContent = describe(h);
    tip.hidden = false;
    var left = mx + 14, topPx = my + 14;
    if (left + tip.offsetWidth > width()) left = Math.max(0, mx - tip.offsetWidth - 10);
    tip.style.left = left + "px"; tip.style.top = topPx + "px";
  });
  canvas.addEventListener("mouseleave", function () { tip.hidden = true; });
  canvas.addEventListener("wheel", function (e) {
    var rect = canvas.getBoundingClientRect(), mx = e.clientX - rect.left;
    if (mx < LABEL_W || !D) return;
    e.preventDefault();
    zoomed = true;
    var t = tOf(mx), k = Math.exp(Math.max(-1, Math.min(1, e.deltaY * 0.0015)));
    var span = Math.min(Math.max((view.t1 - view.t0) * k, 20), wall * 4);
    var f = (t - view.t0) / (view.t1 - view.t0);
    view.t0 = t - f * span; view.t1 = view.t0 + span; draw();
  }, { passive: false });
  canvas.addEventListener("dblclick", function () { zoomed = false; view.t0 = 0; view.t1 = wall; draw(); });
  window.addEventListener("resize", resize);

  return {
    set: function (data) { build(data); resize(); publish(); }
  };
}
