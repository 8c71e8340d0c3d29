// pneumoscan page: upload files to POST /v1/predict and show one card per file.
// Server text is only ever set with textContent (file names and reasons are not HTML).
"use strict";

const PARALLEL = 2;          // uploads in flight at once
const RETRIES_WHEN_BUSY = 3; // 503 answers are retried after their Retry-After

const state = { maxUploadMb: null, queue: [], running: 0 };

const $ = (selector, root = document) => root.querySelector(selector);

function fmt(x, digits = 3) {
  return typeof x === "number" ? x.toFixed(digits) : "-";
}

function show(el, visible = true) {
  el.hidden = !visible;
}

function apiHeaders() {
  const key = $("#api-key").value.trim();
  return key ? { Authorization: "Bearer " + key } : {};
}

// Plain words for each refusal; the server's reason follows them.
const REFUSALS = {
  // one sentence for every reason (adult film, lateral view, other body part, lost detail, modality): the server's
  // reason, which follows, says which
  OutOfScopeError: "Not analysed: this image is outside what the model is validated for (frontal chest X-rays of " +
    "children aged 1-5), so it gives no answer.",
  ImageError: "Could not read this file as an image.",
  UploadTooLarge: "The file is too large for this service.",
  NoFile: "The file did not reach the service.",
  UploadTimeout: "The file took too long to arrive; add it again (on a slow connection, one file at a time).",
  ClientDisconnected: "The upload was interrupted before it was complete; add the file again.",
  BadRequest: "The service could not understand the request; reload the page and add the file again.",
  Unauthorized: "An API key is needed: enter it above and add the file again.",
  Overloaded: "The service is busy; try again in a moment.",
  NotReady: "The model is still loading; try again in a moment.",
  AuditError: "The service could not record the request, so it gave no answer.",
  InternalError: "The service failed on this file.",
  NetworkError: "No answer from the service.",
};

async function loadModel() {
  try {
    const response = await fetch("/v1/model", { headers: apiHeaders() });
    if (response.status === 401) {
      show($("#key-row"));
      $("#model-line").textContent = "API key required";
      return;
    }
    if (!response.ok) {
      $("#model-line").textContent = "model not ready yet";
      setTimeout(loadModel, 2000);
      return;
    }
    const info = await response.json();
    state.maxUploadMb = info.max_upload_mb;
    $("#model-line").textContent =
      `model ${info.model_version}, threshold ${fmt(info.threshold)}` +
      (info.calibrated ? ", calibrated" : ", uncalibrated");
  } catch (err) {
    $("#model-line").textContent = "service unreachable";
  }
}

function newCard(file) {
  const card = $("#card-template").content.firstElementChild.cloneNode(true);
  $(".file-name", card).textContent = file.name || "(unnamed file)";
  $("#results").prepend(card);
  return card;
}

function refuse(card, errorType, reason, requestId) {
  card.dataset.state = "refused";
  show($(".status", card), false);
  const verdict = $(".verdict", card);
  verdict.textContent = errorType === "OutOfScopeError" ? "Refused: outside what the model reads" : "No prediction";
  show(verdict);
  const words = REFUSALS[errorType] || "The service refused this file.";
  $(".reason", card).textContent = reason ? `${words} (${reason})` : words;
  show($(".reason", card));
  if (requestId) $(".meta", card).textContent = `request ${requestId}`;
}

function previewUrl(file) {
  // JPEG and PNG can be shown as they are; DICOM cannot (the heatmap is its only picture).
  return new Promise((resolve) => {
    const url = URL.createObjectURL(file);
    const probe = new Image();
    probe.onload = () => resolve(url);
    probe.onerror = () => { URL.revokeObjectURL(url); resolve(null); };
    probe.src = url;
  });
}

async function render(card, file, result) {
  card.dataset.state = "done";
  show($(".status", card), false);
  const verdict = $(".verdict", card);
  verdict.textContent = result.prediction === "PNEUMONIA" ? "PNEUMONIA suspected" : "NORMAL: no pneumonia found";
  verdict.classList.add(result.prediction);
  show(verdict);

  const badge = $(".badge", card);
  badge.textContent = `Risk ${result.risk_level}`;
  badge.classList.add(result.risk_level);
  badge.title = "LOW: confident prediction; MEDIUM: less sure; HIGH: uncertain, or a view, population or " +
    "image the model is not validated on (see the warnings)";
  show(badge);

  $(".probability-label", card).textContent = result.calibrated ? "P(pneumonia), calibrated" :
    "P(pneumonia), uncalibrated";
  const p = result.probabilities.PNEUMONIA;
  $(".probability", card).textContent = `${fmt(p)} (threshold ${fmt(result.threshold)})`;
  $(".uncertainty", card).textContent = fmt(result.uncertainty);
  $(".confidence", card).textContent = fmt(result.confidence);
  show($(".numbers", card));

  const list = $(".warnings", card);
  for (const text of result.warnings) {
    const item = document.createElement("li");
    item.textContent = text;
    list.append(item);
  }
  show(list, result.warnings.length > 0);
  $(".meta", card).textContent = `${result.model_version} · request ${result.request_id}`;

  const original = await previewUrl(file);
  if (!result.heatmap && !original) return;
  const img = $(".picture", card);
  const toggle = $(".heatmap-toggle", card);
  const caption = $(".caption", card);
  const paint = () => {
    const wantHeatmap = toggle.checked && result.heatmap;
    img.src = wantHeatmap ? result.heatmap : (original || result.heatmap);
    img.alt = wantHeatmap ? `Grad-CAM heatmap of ${result.prediction} over the image` : "the uploaded image";
    caption.textContent = wantHeatmap ? `evidence for ${result.prediction}` :
      (original ? "original" : "no preview for this format");
  };
  toggle.disabled = !result.heatmap;
  toggle.checked = Boolean(result.heatmap);
  toggle.addEventListener("change", paint);
  paint();
  show($(".viewer", card));
}

async function predict(file, card) {
  if (state.maxUploadMb && file.size > state.maxUploadMb * 1024 * 1024) {
    refuse(card, "UploadTooLarge", `${(file.size / 1048576).toFixed(1)} MiB; the limit is ${state.maxUploadMb} MiB`);
    return;
  }
  const heatmap = $("#want-heatmap").checked;
  for (let attempt = 0; ; attempt++) {
    const body = new FormData();
    body.append("file", file, file.name || "upload");
    let response;
    try {
      response = await fetch(`/v1/predict?heatmap=${heatmap}`, { method: "POST", body, headers: apiHeaders() });
    } catch (err) {
      refuse(card, "NetworkError", String(err.message || err));
      return;
    }
    let payload = null;
    try { payload = await response.json(); } catch (err) { payload = null; }
    if (response.ok && payload) {
      await render(card, file, payload);
      return;
    }
    const errorType = (payload && payload.error_type) || `HTTP ${response.status}`;
    if (response.status === 503 && attempt < RETRIES_WHEN_BUSY) {
      const wait = Number(response.headers.get("Retry-After")) || 1;
      $(".status", card).textContent = `Service busy, retrying in ${wait} s\u2026`;
      await new Promise((resolve) => setTimeout(resolve, wait * 1000));
      continue;
    }
    if (response.status === 401) show($("#key-row"));
    refuse(card, errorType, payload && payload.error, payload && payload.request_id);
    return;
  }
}

function pump() {
  while (state.running < PARALLEL && state.queue.length) {
    const [file, card] = state.queue.shift();
    state.running++;
    predict(file, card).finally(() => { state.running--; pump(); });
  }
}

function addFiles(files) {
  for (const file of files) state.queue.push([file, newCard(file)]);
  pump();
}

function setup() {
  const drop = $("#drop");
  const input = $("#files");
  input.addEventListener("change", () => { addFiles(Array.from(input.files)); input.value = ""; });
  for (const name of ["dragenter", "dragover"]) {
    drop.addEventListener(name, (event) => { event.preventDefault(); drop.classList.add("over"); });
  }
  for (const name of ["dragleave", "drop"]) {
    drop.addEventListener(name, (event) => { event.preventDefault(); drop.classList.remove("over"); });
  }
  drop.addEventListener("drop", (event) => addFiles(Array.from(event.dataTransfer.files)));
  $("#key-row").addEventListener("submit", (event) => { event.preventDefault(); loadModel(); });
  loadModel();
}

document.addEventListener("DOMContentLoaded", setup);
