// The page at GET /: pick or drop an image, POST it to /predict, draw the top-5 as bars.
"use strict";

const $ = (id) => document.getElementById(id);

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

async function describeModel() {
  try {
    const answer = await fetch("/health");
    const health = await answer.json();
    if (health.status !== "ready") {
      $("model").textContent = "the model is loading…";
      setTimeout(describeModel, 1000);
      return;
    }
    $("model").textContent = `${health.model} · ${health.resolution} px · ${health.device}` +
      (health.fingerprint ? ` · fingerprint ${health.fingerprint}` : "");
  } catch (err) {
    $("model").textContent = "cannot reach the server";
  }
}

function drawBars(predictions) {
  const list = $("bars");
  list.replaceChildren();
  for (const { label, probability } of predictions) {
    const row = document.createElement("li");
    const name = document.createElement("span");
    name.className = "label";
    name.textContent = label;  // text, never HTML: class names come from a file
    name.title = label;
    const track = document.createElement("span");
    track.className = "track";
    const bar = document.createElement("span");
    bar.className = "bar";
    bar.style.display = "block";
    bar.style.width = `${(100 * probability).toFixed(1)}%`;
    track.append(bar);
    const pct = document.createElement("span");
    pct.className = "pct";
    pct.textContent = `${(100 * probability).toFixed(1)}%`;
    row.append(name, track, pct);
    list.append(row);
  }
}

async function classify(file) {
  showError("");
  $("preview").src = URL.createObjectURL(file);
  const body = new FormData();
  body.append("image", file, file.name);
  const headers = {};
  const key = $("key").value.trim();
  if (key) headers["Authorization"] = `Bearer ${key}`;
  const started = performance.now();
  let answer, data;
  try {
    answer = await fetch("/predict?top_k=5", { method: "POST", body, headers });
    data = await answer.json();
  } catch (err) {
    showError(`no answer from the server (${err})`);
    return;
  }
  const roundTrip = performance.now() - started;
  if (!answer.ok) {
    if (answer.status === 401) $("key-row").hidden = false;
    showError(data.error || `HTTP ${answer.status}`);
    return;
  }
  drawBars(data.results[0].predictions);
  $("latency").textContent = `latency ${roundTrip.toFixed(0)} ms (server ${data.latency_ms.toFixed(1)} ms)` +
    ` · ${data.multi_label ? "sigmoid" : "softmax"}`;
  $("result").hidden = false;
}

$("file").addEventListener("change", (event) => {
  const file = event.target.files[0];
  if (file) classify(file);
});

const drop = $("drop");
drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (event) => {
  event.preventDefault();
  drop.classList.remove("over");
  const file = event.dataTransfer.files[0];
  if (file) classify(file);
});

describeModel();
