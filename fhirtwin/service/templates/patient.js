// fhirtwin patient page: what-if toggles and "write to chart" (no inline script; CSP 'self').
(function () {
  "use strict";
  var csrf = document.querySelector('meta[name="csrf-token"]').getAttribute("content");

  function post(url, body) {
    return fetch(url, {
      method: "POST",
      credentials: "same-origin",
      headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf },
      body: JSON.stringify(body || {})
    }).then(function (response) {
      return response.json().then(function (data) { return { status: response.status, data: data }; });
    });
  }

  function pct(x) { return (100 * x).toFixed(1) + " %"; }

  function chosen() {
    var boxes = document.querySelectorAll('#whatif-form input[name="intervention"]');
    var picked = [];
    boxes.forEach(function (box) { if (box.checked) { picked.push(parseInt(box.value, 10)); } });
    return picked;
  }

  function showWhatif(data) {
    Object.keys(data.risks).forEach(function (outcome) {
      var cell = document.getElementById("whatif-" + outcome);
      if (cell) { cell.textContent = data.interventions.length ? data.risks_text[outcome] : "–"; }
      var change = document.getElementById("arr-" + outcome);
      if (change && data.arr[outcome]) {
        var a = data.arr[outcome];
        change.textContent = data.interventions.length
          ? "−" + (100 * a.median).toFixed(1) + " points (90 % " + (100 * a.p05).toFixed(1) + " to " +
            (100 * a.p95).toFixed(1) + ")"
          : "–";
      }
    });
    Object.keys(data.charts).forEach(function (id) {
      var box = document.getElementById(id);
      if (box) { box.innerHTML = data.charts[id]; }
    });
  }

  function recompute(event) {
    var box = event && event.target;
    if (box && box.checked && box.getAttribute("data-kind") === "statin") {
      document.querySelectorAll('#whatif-form input[data-kind="statin"]').forEach(function (other) {
        if (other !== box) { other.checked = false; }
      });
    }
    var status = document.getElementById("whatif-status");
    status.textContent = "Recomputing…";
    post("/patient/whatif", { interventions: chosen() }).then(function (result) {
      if (result.status !== 200) { status.textContent = "What-if failed: " + (result.data.error || result.status); return; }
      showWhatif(result.data);
      status.textContent = result.data.interventions.length ? "Showing: " + result.data.scenario : "Showing current care";
      status.setAttribute("data-done", String(Date.now()));
    }).catch(function () { status.textContent = "What-if failed: network error"; });
  }

  function write() {
    var out = document.getElementById("write-result");
    var button = document.getElementById("write-button");
    button.disabled = true;
    out.className = "";
    out.textContent = "Writing…";
    post("/patient/write", {}).then(function (result) {
      var d = result.data;
      if (result.status === 200) {
        out.className = "ok";
        out.textContent = (d.status === "written" ? "Written: " + d.created + " resource(s) created" : "Already in the chart: nothing new written") +
          (d.provenance ? " · " + d.provenance : "");
      } else {
        out.className = "failed";
        out.textContent = "Write failed: " + (d.message || d.error || result.status);
      }
      out.setAttribute("data-status", d.status || "error");
      button.disabled = false;
    }).catch(function () { out.className = "failed"; out.textContent = "Write failed: network error"; button.disabled = false; });
  }

  document.addEventListener("DOMContentLoaded", function () {
    var form = document.getElementById("whatif-form");
    if (form) {
      form.addEventListener("change", recompute);
      form.addEventListener("submit", function (e) { e.preventDefault(); });
    }
    var button = document.getElementById("write-button");
    if (button) { button.addEventListener("click", write); }
  });
})();
