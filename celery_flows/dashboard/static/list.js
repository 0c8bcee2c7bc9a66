// The flows list (GET /): filters, newest first, pages from /api/flows.
(function () {
  "use strict";
  var STATES = ["", "running", "paused", "waiting", "succeeded", "failed", "cancelled"];
  var main = document.getElementById("main");
  var params = new URLSearchParams(window.location.search);

  function el(tag, attrs, text) {
    var e = document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (k) { e.setAttribute(k, attrs[k]); });
    if (text !== undefined) e.textContent = text;
    return e;
  }

  var form = el("form", {"class": "filters", method: "get", action: "/"});
  var state = el("select", {name: "state", id: "state-filter"});
  STATES.forEach(function (s) {
    var o = el("option", {value: s}, s || "any state");
    if (s === (params.get("state") || "")) o.selected = true;
    state.appendChild(o);
  });
  var name = el("input", {name: "name", id: "name-filter", placeholder: "flow name",
                          value: params.get("name") || ""});
  form.appendChild(state); form.appendChild(name);
  form.appendChild(el("button", {type: "submit"}, "filter"));
  main.appendChild(form);
  var status = el("p", {id: "status"});
  main.appendChild(status);
  var table = el("table", {id: "flows"});
  var head = el("tr");
  ["flow", "name", "state", "nodes", "created", "finished"].forEach(function (h) {
    head.appendChild(el("th", {}, h));
  });
  table.appendChild(head);
  main.appendChild(table);
  var more = el("button", {id: "more", type: "button"}, "older flows");
  more.hidden = true;
  main.appendChild(more);
  var cursor = null;

  function when(t) { return t ? new Date(t * 1000).toLocaleString() : ""; }

  function row(f) {
    var tr = el("tr", {"class": "flow-row", "data-flow": f.id});
    var td = el("td");
    td.appendChild(el("a", {href: "/flows/" + encodeURIComponent(f.id)}, f.id));
    tr.appendChild(td);
    tr.appendChild(el("td", {}, f.name || ""));
    var st = el("td");
    st.appendChild(el("span", {"class": "state state-" + f.state}, f.state));
    tr.appendChild(st);
    tr.appendChild(el("td", {}, Object.keys(f.nodes).map(function (k) {
      return k + ": " + f.nodes[k];
    }).join(", ")));
    tr.appendChild(el("td", {}, when(f.created_at)));
    tr.appendChild(el("td", {}, when(f.finished_at)));
    return tr;
  }

  function load(append) {
    var q = new URLSearchParams();
    if (params.get("state")) q.set("state", params.get("state"));
    if (params.get("name")) q.set("name", params.get("name"));
    q.set("limit", "50");
    if (append && cursor) q.set("cursor", cursor);
    return fetch("/api/flows?" + q.toString()).then(function (r) { return r.json(); })
      .then(function (doc) {
        if (!append) {
          Array.prototype.slice.call(table.querySelectorAll("tr.flow-row"))
            .forEach(function (r) { r.remove(); });
        }
        doc.flows.forEach(function (f) { table.appendChild(row(f)); });
        cursor = doc.next;
        more.hidden = !cursor;
        status.textContent = table.querySelectorAll("tr.flow-row").length + " flows";
      }).catch(function (err) { status.textContent = "could not load: " + err; });
  }

  more.addEventListener("click", function () { load(true); });
  load(false);
  // the first page refreshes itself; older pages stay as they are
  setInterval(function () { if (!more.dataset.used) load(false); }, 5000);
  more.addEventListener("click", function () { more.dataset.used = "1"; });
})();
