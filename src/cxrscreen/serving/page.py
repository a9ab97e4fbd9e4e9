"""The single, self-contained HTML page served at `/` (inline CSS and JS: no CDN, works offline)."""

from __future__ import annotations

INDEX_HTML = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>cxrscreen: chest X-ray screening</title>
<style>
  body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: #1d2330;
         background: #f6f7f9; max-width: 760px; margin: 0 auto; padding: 1rem 1.25rem 2rem; }
  h1 { font-size: 1.4rem; margin: .25rem 0 .75rem; }
  h2 { font-size: 1.2rem; margin: .5rem 0; }
  .notice { background: #fff4d6; border: 1px solid #e8c66a; border-radius: 6px; padding: .5rem .75rem;
            font-weight: 600; }
  form { display: flex; flex-wrap: wrap; gap: .5rem 1rem; align-items: center; margin: 1rem 0;
         padding: .75rem; background: #fff; border: 1px solid #dde1e7; border-radius: 6px; }
  button { font: inherit; padding: .35rem 1.1rem; border: 0; border-radius: 5px; background: #1d4fb3;
           color: #fff; cursor: pointer; }
  button:disabled { background: #8a9bbd; cursor: progress; }
  .bar { display: grid; grid-template-columns: 7rem 1fr 4.5rem; gap: .5rem; align-items: center;
         margin: .3rem 0; }
  .track { background: #e3e6eb; border-radius: 4px; height: .9rem; overflow: hidden; }
  .fill { background: #7d9be0; height: 100%; }
  .top .fill { background: #1d4fb3; }
  .top { font-weight: 600; }
  .pct { text-align: right; font-variant-numeric: tabular-nums; }
  .flags { color: #9a3412; font-weight: 600; }
  .rule { color: #3a4354; font-size: .9rem; }
  .error { color: #b91c1c; font-weight: 600; }
  figure { margin: 1rem 0 0; }
  img { max-width: 100%; border-radius: 6px; display: block; }
  figcaption, footer { color: #5b6475; font-size: .85rem; margin-top: .4rem; }
</style>
</head>
<body>
<h1>cxrscreen: chest X-ray screening (covid / normal / pneumonia)</h1>
<p class="notice" role="note">Research use only: not a medical device. Do not use these results to diagnose
  or treat anyone.</p>

<form id="form">
  <label>Chest X-ray (PNG, JPEG, TIFF, BMP or DICOM): <input id="file" name="file" type="file" required></label>
  <label>Heatmap for <select id="target"><option value="">the predicted class</option></select></label>
  <button id="go" type="submit">Analyse</button>
</form>

<p id="status" aria-live="polite"></p>

<section id="result" hidden>
  <h2 id="label"></h2>
  <p id="flags" class="flags"></p>
  <div id="bars"></div>
  <p id="rule" class="rule"></p>
  <div id="severity" hidden><h2>Severity (estimate)</h2><p id="sevscores"></p>
    <p id="sevnote" class="rule"></p></div>
  <figure id="figure" hidden>
    <img id="heatmap" alt="Grad-CAM heatmap over the uploaded X-ray">
    <figcaption id="caption"></figcaption>
  </figure>
</section>

<footer id="model"></footer>

<script>
"use strict";
const $ = (id) => document.getElementById(id);
const el = (tag, cls, text) => {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
};
const pct = (p) => (100 * p).toFixed(1) + " %";

let model = null;
fetch("api/model").then((r) => r.json()).then((m) => {
  model = m;
  for (const c of m.classes) { const o = el("option", "", c); o.value = c; $("target").append(o); }
  const sha = (m.weights_sha256 || "unknown").slice(0, 12);
  let text = "Model: " + m.arch + ", weights sha256 " + sha + ".";
  if (m.limits) {
    text += " Limits: uploads up to " + (m.limits.max_upload_bytes / 1e6).toFixed(0) + " MB and "
      + (m.limits.max_pixels / 1e6).toFixed(0) + " million pixels.";
  }
  $("model").textContent = text;
}).catch(() => {});

// The decision rule: from the result's own `decision` field, else from the model's configuration.
function ruleText(d) {
  let rule = d.decision || (model && model.decision);
  if (!rule && model && model.covid_threshold != null) {
    rule = { rule: "operating_point", threshold: model.covid_threshold, class: "covid" };
  }
  if (!rule) return "";
  if (rule.rule === "operating_point") {
    return "How the class is chosen: " + rule.class + " whenever its probability is at least "
      + pct(rule.threshold) + " (an operating point chosen on validation data to miss few "
      + rule.class + " cases), otherwise the most probable of the other classes. A class can therefore "
      + "be given with a lower probability than another.";
  }
  return "How the class is chosen: the most probable class.";
}

function show(d) {
  $("label").textContent = d.class ? "Predicted: " + d.class : "No diagnosis";
  const flags = d.flags || [];
  $("flags").textContent = d.class
    ? (flags.length ? "Flags: " + flags.join("; ") : "")
    : "No diagnosis is given for this image" + (flags.length ? ": " + flags.join("; ") : "") + ".";
  $("rule").textContent = d.class ? ruleText(d) : "";
  const bars = $("bars");
  bars.replaceChildren();
  for (const [c, p] of Object.entries(d.class ? (d.probabilities || {}) : {})) {
    const row = el("div", "bar" + (c === d.class ? " top" : ""));
    const track = el("div", "track");
    const fill = el("div", "fill");
    fill.style.width = (100 * p).toFixed(1) + "%";
    track.append(fill);
    row.title = c + " " + pct(p);
    row.append(el("span", "", c), track, el("span", "pct", pct(p)));
    bars.append(row);
  }
  if (d.heatmap_png_base64) {
    $("heatmap").src = "data:image/png;base64," + d.heatmap_png_base64;
    $("caption").textContent = "Grad-CAM heatmap for class " + d.heatmap_target
      + ": where the model looked, not where disease is (red: most)."
      + (d.heatmap_in_lungs == null ? "" : " Heat inside the lungs: " + Math.round(100 * d.heatmap_in_lungs)
         + " %.");
    $("figure").hidden = false;
  } else {
    $("figure").hidden = true;
  }
  showSeverity(d.severity);
  $("result").hidden = false;
}
// Severity: only for an image not called normal and not flagged (the API sends null otherwise).
function showSeverity(s) {
  if (!s) { $("severity").hidden = true; return; }
  const z = s.zones.map((q) => q.brixia + " " + q.extent_estimate.toFixed(1)).join(", ");
  $("sevscores").textContent = "Geographic extent " + s.geographic_extent.toFixed(1) + " / 8, opacity "
    + s.opacity.toFixed(1) + " / 6. Per lung: right " + s.per_lung.right.toFixed(1) + " / 4, left "
    + s.per_lung.left.toFixed(1) + " / 4. Zones (Brixia layout, drawn on the image): " + z + ".";
  const cv = model && model.severity && model.severity.cv;
  $("sevnote").textContent = (cv ? "Cross-validated error: extent MAE " + cv.geographic_extent.mae.value.toFixed(2)
    + ", opacity MAE " + cv.opacity.mae.value.toFixed(2) + ". " : "") + "Per-lung and zone figures are "
    + "estimates (lung boxes: " + Object.values(s.lung_boxes_source).join(", ") + "): " + s.estimate;
  $("severity").hidden = false;
}

$("form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const file = $("file").files[0];
  if (!file) return;
  const body = new FormData();
  body.append("file", file);
  let url = "api/predict?heatmap=true";
  if ($("target").value) url += "&target=" + encodeURIComponent($("target").value);
  if (model && model.severity) url += "&severity=true";
  $("status").className = "";
  $("status").textContent = "Analysing " + file.name + " ...";
  $("result").hidden = true;
  $("go").disabled = true;
  try {
    const r = await fetch(url, { method: "POST", body });
    const d = await r.json().catch(() => ({}));
    if (!r.ok) throw new Error(d.error || (typeof d.detail === "string" ? d.detail : "HTTP " + r.status));
    $("status").textContent = "";
    show(d);
  } catch (e) {
    $("status").className = "error";
    $("status").textContent = "Error: " + e.message;
  } finally {
    $("go").disabled = false;
  }
});
</script>
</body>
</html>
"""
