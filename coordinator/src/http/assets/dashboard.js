// fly's live dashboard: polls the page's JSON (/api/...) once a second and draws it. Plain
// DOM, no framework; every text from the coordinator goes in through textContent, never as
// markup. The timeline is the report's own drawing code (flyTimeline, from timeline.js).
(function () {
  "use strict";
  var app = document.getElementById("app");
  var pageName = app.getAttribute("data-page");
  var pollMs = parseInt(app.getAttribute("data-poll-ms"), 10) || 1000;
  var token = new URLSearchParams(window.location.search).get("token");
  var errorBox = document.getElementById("error");
  var updated = document.getElementById("updated");

  // With a token in the URL, every link and request carries it on.
  function withToken(path) {
    if (!token) return path;
    return path + (path.indexOf("?") < 0 ? "?" : "&") + "token=" + encodeURIComponent(token);
  }
  Array.prototype.forEach.call(document.querySelectorAll("a[data-keep-token]"), function (a) {
    var href = a.getAttribute("href");
    if (href) a.setAttribute("href", withToken(href));
  });

  function el(tag, attrs, children) {
    var node = document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (k) {
      if (k === "text") node.textContent = attrs[k];
      else if (k === "className") node.className = attrs[k];
      else node.setAttribute(k, attrs[k]);
    });
    (children || []).forEach(function (c) {
      if (c === null || c === undefined) return;
      node.appendChild(typeof c === "string" ? document.createTextNode(c) : c);
    });
    return node;
  }
  function clear(node) { while (node.firstChild) node.removeChild(node.firstChild); return node; }
  function byId(id) { return document.getElementById(id); }

  function fmtSeconds(s) {
    if (s === null || s === undefined || !isFinite(s)) return "-";
    s = Math.max(0, s);
    if (s < 0.001) return (s * 1e6).toFixed(0) + "us";
    if (s < 1) return (s * 1e3).toFixed(1) + "ms";
    if (s < 60) return s.toFixed(s < 10 ? 2 : 1) + "s";
    var whole = Math.round(s);
    if (s < 3600) return Math.floor(whole / 60) + "m" + ("0" + (whole % 60)).slice(-2) + "s";
    return Math.floor(whole / 3600) + "h" + ("0" + Math.floor((whole % 3600) / 60)).slice(-2) + "m";
  }
  function fmtCounts(counts) {
    var parts = (counts || []).filter(function (c) { return c[1] > 0; }).map(function (c) {
      var noun = c[0] === "error" ? (c[1] === 1 ? "error" : "errors") : c[0];
      return c[1] + " " + noun;
    });
    return parts.length ? parts.join(", ") : "no tests ran yet";
  }
  function fmtTime(epoch) {
    if (!epoch) return "-";
    var d = new Date(epoch * 1000);
    return isNaN(d) ? "-" : d.toLocaleString();
  }
  function shortId(id) { return String(id || "").slice(0, 8); }
  function runLink(id, text) {
    return el("a", { href: withToken("/runs/" + encodeURIComponent(id)), className: "run-link" },
      [el("code", { text: text || shortId(id) })]);
  }
  function failing(counts) {
    return (counts || []).some(function (c) { return (c[0] === "failed" || c[0] === "error") && c[1] > 0; });
  }
  function meter(done, total, counts) {
    var pct = total > 0 ? Math.min(100, 100 * done / total) : 0;
    var inner = el("i", { style: "width:" + pct.toFixed(1) + "%" + (failing(counts) ? ";background:#d62828" : "") });
    return el("span", {}, [el("span", { className: "bar" }, [inner]), done + " / " + (total || "?")]);
  }
  function statusChip(status) {
    var cls = String(status || "").replace(/[^A-Za-z0-9_-]/g, "");
    return el("span", { className: "status status-" + cls, text: status || "?" });
  }
  function table(headers, rows, attrs) {
    return el("table", attrs || {}, [
      el("thead", {}, [el("tr", {}, headers.map(function (h) {
        return el("th", { className: h.num ? "num" : "", text: h.text || h });
      }))]),
      el("tbody", {}, rows)
    ]);
  }
  function td(content, cls) {
    return el("td", cls ? { className: cls } : {}, [content]);
  }

  function showError(message) { errorBox.textContent = message; errorBox.hidden = false; }

  function fetchJson(path) {
    return fetch(withToken(path), { cache: "no-store" }).then(function (r) {
      if (!r.ok) return r.text().then(function (t) { throw new Error(r.status + " " + t); });
      return r.json();
    });
  }

  // Polls `path` and hands each answer to `render`, until render returns false.
  function poll(path, render) {
    var stopped = false;
    function tick() {
      fetchJson(path).then(function (data) {
        errorBox.hidden = true;
        updated.textContent = "updated " + new Date().toLocaleTimeString();
        if (render(data) === false) {
          stopped = true;
          updated.textContent = "finished · " + updated.textContent;
        }
      }).catch(function (e) {
        showError(String((e && e.message) || e));
      }).then(function () {
        if (!stopped) setTimeout(tick, pollMs);
      });
    }
    tick();
  }

  // --- runs ----------------------------------------------------------------------------------
  function runsPage() {
    poll("/api/overview", function (data) {
      var live = byId("live-runs");
      clear(live);
      if (!data.runs.length) {
        live.appendChild(el("p", { className: "muted", text: "No run in progress." }));
      } else {
        live.appendChild(table(["run", "project", "state", "progress",
          { text: "running", num: true }, { text: "queued", num: true }, "so far",
          { text: "ETA", num: true }, { text: "workers", num: true }],
          data.runs.map(function (r) {
            return el("tr", { className: "live-run", "data-run": r.id }, [
              td(runLink(r.id)), td(r.project), td(statusChip(r.phase)),
              td(meter(r.finished, r.collected, r.counts)),
              td(String(r.running), "num"), td(String(r.queued), "num"), td(fmtCounts(r.counts)),
              td(r.eta_seconds === null ? "-" : fmtSeconds(r.eta_seconds), "num"),
              td(String(r.workers), "num")
            ]);
          }), { id: "live-table" }));
      }
      byId("farm").textContent = data.agents + " agent(s), " + data.workers + " worker(s), " +
        data.busy_workers + " busy; desired workers for the queued work: " + data.desired_workers;
      var recent = clear(byId("recent-runs"));
      if (!data.recent.length) {
        recent.appendChild(el("p", { className: "muted", text: "No runs recorded yet." }));
      } else {
        recent.appendChild(table(["run", "project", "status", "created",
          { text: "duration", num: true }, { text: "tests", num: true }, "summary"],
          data.recent.map(function (r) {
            return el("tr", {}, [
              td(runLink(r.id)), td(r.project), td(statusChip(r.status)), td(r.created),
              td(r.duration === null ? "-" : fmtSeconds(r.duration), "num"),
              td(r.collected === null ? "-" : String(r.collected), "num"),
              td(r.duration === null && !r.counts.length ? "in progress" : fmtCounts(r.counts))
            ]);
          })));
      }
      document.title = "fly: " + data.runs.length + " run(s) in progress";
    });
  }

  // --- one run -------------------------------------------------------------------------------
  function runPage() {
    var id = app.getAttribute("data-run");
    var timeline = flyTimeline(byId("timeline"), byId("timeline-box"), byId("tip"));
    poll("/api/runs/" + encodeURIComponent(id), function (data) {
      var run = data.run, live = data.live, stats = data.stats;
      byId("run-id").textContent = shortId(run.id);
      byId("run-id").title = run.id;
      byId("run-project").textContent = run.project;
      var status = live ? live.phase : run.status;
      var chip = byId("run-status");
      chip.textContent = status;
      chip.className = "status status-" + String(status).replace(/[^A-Za-z0-9_-]/g, "");
      byId("full-report").setAttribute("href", withToken("/runs/" + encodeURIComponent(run.id) + "/report"));

      var finished = live ? live.finished : stats.tests;
      var collected = live ? live.collected : (run.collected || 0);
      var counts = live ? live.counts : run.counts;
      var pct = collected > 0 ? Math.min(100, 100 * finished / collected) : (live ? 0 : 100);
      byId("progress-bar").style.width = pct.toFixed(1) + "%";
      byId("progress-bar").parentNode.className = "progress" + (failing(counts) ? " failing" : "");
      byId("progress").textContent = finished + " of " + collected + " tests finished · " + fmtCounts(counts);
      byId("progress").setAttribute("data-finished", String(finished));

      var elapsed = (run.finished_at || data.at) - run.created_at;
      var cards = clear(byId("run-cards"));
      function card(label, value, note) {
        cards.appendChild(el("div", { className: "card" }, [
          el("div", { className: "label", text: label }), el("div", { className: "value", text: value }),
          el("div", { className: "note", text: note || "" })]));
      }
      card(live ? "elapsed" : "duration", fmtSeconds(elapsed), "since submitted");
      if (live) {
        card("ETA", live.eta_seconds === null ? "-" : fmtSeconds(live.eta_seconds),
          "remaining work from history / workers' speed");
        card("running", String(live.running), live.queued + " queued");
        card("workers", String(live.workers), "on " + live.agents + " agent(s)");
      } else {
        card("speed-up", stats.achieved_speedup.toFixed(2) + "x", "total test time / wall");
        card("utilization", (stats.overall_utilization * 100).toFixed(1) + "%", stats.workers + " workers");
        card("exit code", run.exit_code === null ? "-" : String(run.exit_code), run.status);
      }

      timeline.set(data.timeline);
      byId("timeline-note").textContent = data.truncated
        ? "Showing the most recent " + data.shown_reports + " phase reports; the full report has them all."
        : (data.shown_reports ? "" : "No test has reported yet.");

      var rows = data.running.map(function (t) {
        return el("tr", { className: "running-test" }, [td(t.hostname + " (" + t.agent_id + ")"),
          td("w" + t.worker), td(el("code", { text: t.nodeid })), td(fmtSeconds(data.at - t.since), "num")]);
      });
      var tbody = clear(byId("running").tBodies[0]);
      rows.forEach(function (r) { tbody.appendChild(r); });
      if (!rows.length) tbody.appendChild(el("tr", {}, [el("td", { colspan: "4", className: "muted", text: "none" })]));

      byId("failure-count").textContent = "(" + data.failures_total + ")";
      var list = clear(byId("failure-list"));
      if (!data.failures.length) list.appendChild(el("p", { className: "muted", text: "None so far." }));
      data.failures.forEach(function (f) {
        var details = el("details", { className: "failure" }, [
          el("summary", {}, [el("span", { className: "oc oc-" + (f.category || "failed"), text: f.category || "failed" }), " ",
            el("code", { text: f.nodeid }), " ", el("span", { className: "phase", text: "in " + f.phase }), " ",
            f.message || ""]),
          el("pre", { className: "traceback", text: f.longrepr || "(no traceback recorded)" })
        ]);
        (f.sections || []).forEach(function (s) {
          details.appendChild(el("h4", { text: s[0] }));
          details.appendChild(el("pre", { className: "section", text: s[1] }));
        });
        list.appendChild(details);
      });
      if (data.failures_total > data.failures.length) {
        list.appendChild(el("p", { className: "muted", text: (data.failures_total - data.failures.length) +
          " more in the full report." }));
      }
      document.title = "fly: " + run.project + " " + finished + "/" + collected + " (" + status + ")";
      // A finished run's record no longer changes once its verdict is written.
      return !(!live && run.finished_at);
    });
  }

  // --- agents --------------------------------------------------------------------------------
  function agentsPage() {
    poll("/api/agents", function (data) {
      var projects = {};
      data.runs.forEach(function (r) { projects[r.id] = r.project; });
      var busy = 0, workers = 0;
      var box = clear(byId("agents"));
      data.agents.forEach(function (a) {
        var m = a.machine;
        function fact(label, value) { return el("span", {}, [el("b", { text: label }), value]); }
        var facts = el("div", { className: "facts" }, [
          fact("system", m.os + " " + m.arch + " (fly " + m.fly_version + ")"),
          fact("cores", m.performance_cores + " performance + " + m.efficiency_cores + " efficiency (" +
            m.core_kind_source + ")"),
          fact("logical CPUs", String(m.logical_cpus) + " of " + m.physical_cores + " physical cores"),
          fact("SMT", m.threads_per_core > 1 ? m.threads_per_core + " threads/core" : "no"),
          fact("quota", m.cpu_quota === null ? "unlimited" : m.cpu_quota.toFixed(2) + " CPUs"),
          fact("memory", (m.memory_bytes / 1073741824).toFixed(1) + " GiB"),
          fact("speed", m.speed === null ? "-" : m.speed.toFixed(2)),
          fact("workers", a.workers + (m.auto_workers ? " (auto " + m.auto_workers + ")" : "")),
          fact("connected", fmtTime(a.connected_at)),
          fact("serving", a.run ? (projects[a.run] || "") + " " : "idle"),
          a.run ? runLink(a.run) : null
        ]);
        var labels = Object.keys(a.labels || {}).map(function (k) {
          return el("span", { className: "label-chip", text: k + "=" + a.labels[k] });
        });
        var rows = a.worker_states.map(function (w) {
          workers += 1;
          var t = w.test;
          if (t) busy += 1;
          return el("tr", { className: "worker", "data-worker": String(w.worker), "data-state": t ? "busy" : "idle" }, [
            td("w" + w.worker), td(t ? "running" : "idle", "state"),
            td(t ? el("code", { className: "nodeid", text: t.nodeid }) : ""),
            td(t ? fmtSeconds(data.at - t.since) : "", "num"),
            td(t ? runLink(t.run) : "")
          ]);
        });
        box.appendChild(el("section", { className: "agent", "data-agent-id": a.id }, [
          el("h3", {}, [el("span", { className: "hostname", text: a.hostname }), el("code", { text: a.id })]),
          facts,
          labels.length ? el("div", { className: "labels" }, labels) : null,
          el("p", { className: "muted", text: "workdir " + a.workdir + " · python " + a.python }),
          table(["worker", "state", "test", { text: "for", num: true }, "run"], rows, { className: "workers" })
        ]));
      });
      if (!data.agents.length) box.appendChild(el("p", { className: "muted", text: "No agent is connected." }));
      byId("agents-summary").textContent = data.agents.length + " agent(s) connected, " + workers +
        " worker(s), " + busy + " running a test now.";
      document.title = "fly: " + data.agents.length + " agent(s), " + busy + " busy";
    });
  }

  if (pageName === "runs") runsPage();
  else if (pageName === "run") runPage();
  else if (pageName === "agents") agentsPage();
})();
