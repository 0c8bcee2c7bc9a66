// A flow's page (GET /flows/<id>): its DAG as SVG (layout by the vendored dagre), node
// colours by state updated live from Server-Sent Events (Last-Event-ID resumes after a
// reconnect; polling when the stream is unavailable), a node panel, a timeline and the
// actions (with the dashboard token). Big graphs: map items and sub-flows collapse into
// one box each, and past DRAW_CAP boxes the rest is left out, with a banner.
(function () {
  "use strict";
  var FID = document.body.dataset.flow;
  var COLLAPSE_AT = 200;  // more nodes than this: maps and sub-flows start collapsed
  var DRAW_CAP = 1500;    // never draw more boxes than this
  var MAP_COLLAPSE_AT = 36;  // a map of more items than this starts collapsed
  var TERMINAL = {succeeded: 1, failed: 1, cancelled: 1};
  var RANK = {failed: 9, running: 8, retrying: 7, queued: 6, scheduled: 5, awaiting: 4,
              pending: 3, cancelled: 2, skipped: 1, succeeded: 0};
  var SVGNS = "http://www.w3.org/2000/svg";
  var main = document.getElementById("main");
  var doc = null, selected = null, expanded = {}, boxOf = {}, refetchTimer = null;
  var poller = null, source = null;

  function el(tag, attrs, text) {
    var e = document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (k) { e.setAttribute(k, attrs[k]); });
    if (text !== undefined) e.textContent = text;
    return e;
  }
  function svg(tag, attrs) {
    var e = document.createElementNS(SVGNS, tag);
    Object.keys(attrs || {}).forEach(function (k) { e.setAttribute(k, attrs[k]); });
    return e;
  }
  function when(t) { return t ? new Date(t * 1000).toLocaleTimeString() : "-"; }

  var head = el("div");
  var flowState = el("span", {id: "flow-state", "class": "state"});
  head.appendChild(el("strong", {}, FID + " "));
  head.appendChild(flowState);
  var live = el("span", {id: "live"}, "");
  head.appendChild(document.createTextNode(" "));
  head.appendChild(live);
  main.appendChild(head);

  var actions = el("div", {"class": "actions"});
  var token = el("input", {id: "token", type: "password", placeholder: "dashboard token",
                           autocomplete: "off"});
  token.value = sessionStorage.getItem("flows-token") || "";
  actions.appendChild(token);
  ["cancel", "pause", "resume", "retry"].forEach(function (name) {
    var b = el("button", {type: "button", id: "action-" + name}, name);
    b.addEventListener("click", function () { act(name); });
    actions.appendChild(b);
  });
  var actionOut = el("span", {id: "action-result"});
  actions.appendChild(actionOut);
  main.appendChild(actions);
  var banner = el("div", {id: "banner", "class": "banner"});
  banner.hidden = true;
  main.appendChild(banner);
  var layout = el("div", {"class": "layout"});
  var graph = el("div", {"class": "graph", id: "graph"});
  var panel = el("div", {"class": "panel", id: "panel"}, "Select a node.");
  layout.appendChild(graph); layout.appendChild(panel);
  main.appendChild(layout);
  var timeline = el("div", {"class": "timeline", id: "timeline"});
  main.appendChild(timeline);
  var hooks = el("div", {id: "webhooks"});
  main.appendChild(hooks);

  function act(name) {
    sessionStorage.setItem("flows-token", token.value);
    fetch("/api/flows/" + encodeURIComponent(FID) + "/" + name, {
      method: "POST", headers: {"Authorization": "Bearer " + token.value}
    }).then(function (r) {
      return r.json().then(function (body) { return {status: r.status, body: body}; });
    }).then(function (res) {
      actionOut.className = res.status === 200 ? "" : "error";
      actionOut.textContent = res.status === 200 ? name + ": flow " + res.body.state
        : res.status + ": " + res.body.error;
      refetch();
    }).catch(function (err) { actionOut.textContent = String(err); });
  }

  // -- the graph ------------------------------------------------------------------
  // The group a node collapses into: "each[3]" -> "each[*]", "sub:x" -> "sub:*".
  function groupOf(id) {
    var m = /^(.*)\[\d+\]$/.exec(id);
    if (m) return m[1] + "[*]";
    var i = id.indexOf(":");
    return i > 0 ? id.slice(0, i) + ":*" : null;
  }

  // A map's items collapse into one box past a few dozen, whatever the graph's size.
  function folded(id) {
    var owner = doc.nodes[id].map;
    if (owner !== undefined && owner !== null && doc.nodes[owner] &&
        doc.nodes[owner].items > MAP_COLLAPSE_AT) {
      return true;
    }
    return Object.keys(doc.nodes).length > COLLAPSE_AT;
  }

  function boxes() {
    var ids = Object.keys(doc.nodes);
    boxOf = {};
    ids.forEach(function (id) {
      var g = groupOf(id);
      boxOf[id] = g && folded(id) && !expanded[g] ? g : id;
    });
    return ids;
  }

  function boxState(members) {
    var best = null;
    members.forEach(function (id) {
      var s = doc.nodes[id].state;
      if (best === null || RANK[s] > RANK[best]) best = s;
    });
    return best;
  }

  function draw() {
    var ids = boxes();
    var members = {}, order = [];
    ids.forEach(function (id) {
      var b = boxOf[id];
      if (!members[b]) { members[b] = []; order.push(b); }
      members[b].push(id);
    });
    var shown = order.slice(0, DRAW_CAP);
    var shownSet = {};
    shown.forEach(function (b) { shownSet[b] = 1; });
    var notes = [];
    if (order.length < ids.length) {
      notes.push(ids.length + " nodes: map items and sub-flows are collapsed (click a " +
                 "dashed box to expand it)");
    }
    if (shown.length < order.length) {
      notes.push("showing the first " + shown.length + " of " + order.length + " boxes");
    }
    banner.hidden = notes.length === 0;
    banner.textContent = notes.join("; ");

    var g = new dagre.graphlib.Graph();
    g.setGraph({rankdir: "LR", nodesep: 12, ranksep: 40, marginx: 10, marginy: 10});
    g.setDefaultEdgeLabel(function () { return {}; });
    shown.forEach(function (b) {
      g.setNode(b, {width: Math.min(40 + 7 * b.length, 220), height: 30});
    });
    var edges = {};
    ids.forEach(function (id) {
      (doc.nodes[id].after || []).forEach(function (dep) {
        var from = boxOf[dep], to = boxOf[id];
        if (from && from !== to && shownSet[from] && shownSet[to]) {
          edges[from + "\u0000" + to] = [from, to];
        }
      });
    });
    Object.keys(edges).forEach(function (k) { g.setEdge(edges[k][0], edges[k][1]); });
    dagre.layout(g);
    var size = g.graph();
    var root = svg("svg", {id: "dag", width: Math.max(size.width, 100),
                           height: Math.max(size.height, 60)});
    var defs = svg("defs");
    var marker = svg("marker", {id: "arrow", viewBox: "0 0 10 10", refX: "10", refY: "5",
                                markerWidth: "6", markerHeight: "6", orient: "auto"});
    marker.appendChild(svg("path", {d: "M 0 0 L 10 5 L 0 10 z", fill: "#888"}));
    defs.appendChild(marker);
    root.appendChild(defs);
    g.edges().forEach(function (e) {
      var pts = g.edge(e).points;
      var d = "M" + pts.map(function (p) { return p.x + "," + p.y; }).join(" L");
      root.appendChild(svg("path", {"class": "edge", d: d, "data-from": e.v,
                                    "data-to": e.w}));
    });
    shown.forEach(function (b) {
      var n = g.node(b);
      var group = members[b].length > 1 || b !== members[b][0];
      var box = svg("g", {"class": "node state-" + boxState(members[b]) +
                                   (group ? " group" : ""),
                          "data-node": b, transform: "translate(" + (n.x - n.width / 2) +
                                                     "," + (n.y - n.height / 2) + ")"});
      box.appendChild(svg("rect", {width: n.width, height: n.height, rx: 4}));
      var t = svg("text", {x: 6, y: 19});
      t.textContent = group ? b + " (" + members[b].length + ")" : b;
      box.appendChild(t);
      box.addEventListener("click", function () {
        if (group) { expanded[b] = true; draw(); return; }
        selected = b; showPanel(); mark();
      });
      root.appendChild(box);
    });
    graph.replaceChildren(root);
    mark();
  }

  function mark() {
    Array.prototype.forEach.call(graph.querySelectorAll("g.node"), function (n) {
      n.classList.toggle("selected", n.dataset.node === selected);
    });
  }

  // the colour of one node (or its group's box) from its state, without a redraw
  function recolour(id) {
    var b = boxOf[id];
    if (!b) return;
    var box = graph.querySelector('g.node[data-node="' + CSS.escape(b) + '"]');
    if (!box) return;
    var ms = Object.keys(boxOf).filter(function (k) { return boxOf[k] === b; });
    var cls = box.getAttribute("class").replace(/state-\w+/, "state-" + boxState(ms));
    box.setAttribute("class", cls);
  }

  function showPanel() {
    if (!selected || !doc.nodes[selected]) return;
    var n = doc.nodes[selected];
    var dl = el("dl");
    function row(k, v) { dl.appendChild(el("dt", {}, k)); dl.appendChild(el("dd", {}, v)); }
    row("node", selected);
    row("task", n.task || "-");
    row("state", n.state + (n.skip_reason ? " (" + n.skip_reason + ")" : ""));
    row("after", (n.after || []).join(", ") || "-");
    row("queue", n.queue || "default");
    row("attempts", n.attempts + " (retries " + n.retries + ", recoveries " +
        n.recoveries + ")");
    row("queued / started / finished", when(n.queued_at) + " / " + when(n.started_at) +
        " / " + when(n.finished_at));
    row("error", n.error || "-");
    row("milestones", (n.progress || []).map(function (p) {
      return (p.percent === null ? "" : p.percent + "% ") + (p.message || "");
    }).join("; ") || "-");
    row("waiting for", n.waiting_for || "-");
    if (n.args !== undefined) row("arguments", JSON.stringify(n.args));
    panel.replaceChildren(dl);
  }

  function drawTimeline() {
    var runs = Object.keys(doc.nodes).map(function (id) {
      return [id, doc.nodes[id]];
    }).filter(function (r) { return r[1].started_at; }).sort(function (a, b) {
      return a[1].started_at - b[1].started_at;
    }).slice(0, 300);
    if (!runs.length) { timeline.textContent = "No node has started yet."; return; }
    var t0 = runs[0][1].started_at, t1 = doc.now;
    runs.forEach(function (r) { t1 = Math.max(t1, r[1].finished_at || 0); });
    var span = Math.max(t1 - t0, 0.001), width = 800, rowH = 16;
    var root = svg("svg", {id: "timeline-svg", width: width + 200,
                           height: runs.length * rowH + 4});
    runs.forEach(function (r, i) {
      var n = r[1], end = n.finished_at || doc.now;
      var x = 200 + (n.started_at - t0) / span * width;
      var w = Math.max((end - n.started_at) / span * width, 2);
      var label = svg("text", {x: 2, y: i * rowH + 12});
      label.textContent = r[0];
      root.appendChild(label);
      root.appendChild(svg("rect", {"class": "bar state-" + n.state, x: x, y: i * rowH + 2,
                                    width: w, height: rowH - 4}));
    });
    timeline.replaceChildren(root);
  }

  // the webhook's delivery log (inspect's "webhooks"), newest first
  function drawWebhooks() {
    var log = (doc.webhooks || []).slice().reverse();
    if (!log.length) { hooks.replaceChildren(); return; }
    var table = el("table", {id: "webhook-log"});
    var head = el("tr");
    ["webhook sent", "event", "to", "status", "error"].forEach(function (h) {
      head.appendChild(el("th", {}, h));
    });
    table.appendChild(head);
    log.forEach(function (e) {
      var tr = el("tr", {"class": "webhook-row"});
      [when(e.at), e.event_id, e.to, e.status === null ? "-" : String(e.status),
       e.error || ""].forEach(function (v) { tr.appendChild(el("td", {}, v)); });
      table.appendChild(tr);
    });
    hooks.replaceChildren(el("h3", {}, "Webhook deliveries"), table);
  }

  function render(full) {
    flowState.textContent = doc.state;
    flowState.className = "state state-" + doc.state;
    if (full) draw();
    else Object.keys(doc.nodes).forEach(recolour);
    showPanel();
    drawTimeline();
    drawWebhooks();
  }

  function refetch(full) {
    return fetch("/api/flows/" + encodeURIComponent(FID)).then(function (r) {
      if (!r.ok) throw new Error("the flow is gone (" + r.status + ")");
      return r.json();
    }).then(function (d) {
      var shape = !doc || Object.keys(d.nodes).length !== Object.keys(doc.nodes).length;
      doc = d;
      render(full || shape);
      return d;
    });
  }

  // timings and the panel follow the events, at most once a second
  function soon() {
    if (refetchTimer) return;
    refetchTimer = setTimeout(function () {
      refetchTimer = null;
      refetch(false).catch(function () {});
    }, 1000);
  }

  function onEvent(e) {
    if (e.node === null) {
      doc.state = e.state;
      flowState.textContent = e.state;
      flowState.className = "state state-" + e.state;
    } else if (doc.nodes[e.node]) {
      doc.nodes[e.node].state = e.state;
      recolour(e.node);
    } else {
      soon();  // a node that joined the flow (a map's items, add_node)
    }
    live.dataset.last = e.id;
    soon();
  }

  function poll() {
    if (poller) return;
    live.textContent = "(polling)";
    poller = setInterval(function () {
      refetch(false).then(function (d) {
        if (TERMINAL[d.state]) { clearInterval(poller); live.textContent = ""; }
      }).catch(function () {});
    }, 2000);
  }

  function stream() {
    if (typeof EventSource === "undefined") { poll(); return; }
    source = new EventSource("/api/flows/" + encodeURIComponent(FID) + "/events");
    var failures = 0;
    source.onopen = function () { failures = 0; live.textContent = "(live)"; };
    source.onmessage = function (m) { onEvent(JSON.parse(m.data)); };
    source.addEventListener("end", function () {
      source.close(); live.textContent = ""; soon();
    });
    source.onerror = function () {
      // EventSource reconnects by itself, sending Last-Event-ID; poll if it keeps failing
      failures += 1;
      if (failures >= 3 || source.readyState === EventSource.CLOSED) {
        source.close(); poll();
      }
    };
  }

  refetch(true).then(stream).catch(function (err) {
    main.appendChild(el("p", {"class": "error"}, String(err)));
  });
})();
