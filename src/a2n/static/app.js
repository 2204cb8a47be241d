"use strict";

// The a2n page: queue images, upload them one at a time to /api/upscale, compare and download.

const $ = (id) => document.getElementById(id);
const jobs = [];
let busy = false;
let shown = null;
let zoom = 1;

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = false;
}

function clearError() {
  $("error").hidden = true;
  $("error").textContent = "";
}

function megabytes(bytes) {
  return `${(bytes / 2 ** 20).toFixed(bytes < 2 ** 20 ? 2 : 0)} MB`;
}

async function loadHealth() {
  let health;
  try {
    const response = await fetch("/api/health");
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    health = await response.json();
  } catch (err) {
    $("server-info").textContent = "The server does not answer.";
    showError(`Cannot reach the a2n server (${err.message}); is a2n serve running?`);
    return;
  }
  const radios = [...document.querySelectorAll("input[name=scale]")];
  for (const radio of radios) {
    radio.disabled = !health.scales.includes(Number(radio.value));
    radio.parentElement.title = radio.disabled ? `This server has no weights for ×${radio.value}` : "";
  }
  const enabled = radios.filter((r) => !r.disabled);
  if (enabled.length && !enabled.some((r) => r.checked)) enabled[enabled.length - 1].checked = true;
  $("server-info").textContent = health.scales.length
    ? `Ready to upscale ${health.scales.map((s) => `×${s}`).join(", ")}.`
    : "This server has no weights; start it with a2n serve --weights 4=FILE.";
  $("limits").textContent = `PNG, JPEG, WebP, TIFF or BMP; at most ${megabytes(health.max_upload_bytes)} and `
    + `${(health.max_pixels / 1e6).toFixed(1)} megapixels per image.`;
}

function addFiles(files) {
  if (!files.length) return;
  clearError();
  const scale = Number(document.querySelector("input[name=scale]:checked")?.value || 4);
  const format = $("format").value;
  const ensemble = $("ensemble").checked;
  for (const file of files) {
    const job = { file, scale, format, ensemble, state: "waiting", sourceUrl: URL.createObjectURL(file) };
    job.el = renderJob(job);
    jobs.push(job);
  }
  pump();
}

function renderJob(job) {
  const li = document.createElement("li");
  li.className = "job";
  li.innerHTML = `<span class="name"></span><progress max="100" value="0"></progress>`
    + `<span class="status" aria-live="polite">Waiting</span><span class="actions"></span>`;
  li.querySelector(".name").textContent = `${job.file.name} (×${job.scale}${job.ensemble ? ", A2N+" : ""})`;
  li.querySelector(".name").title = job.file.name;
  li.querySelector("progress").setAttribute("aria-label", `Progress of ${job.file.name}`);
  $("jobs").append(li);
  return li;
}

function setStatus(job, state, text, percent) {
  job.state = state;
  job.el.className = `job ${state}${job === shown ? " selected" : ""}`;
  job.el.querySelector(".status").textContent = text;
  const bar = job.el.querySelector("progress");
  if (percent === null) bar.removeAttribute("value");
  else bar.value = percent;
  const actions = job.el.querySelector(".actions");
  actions.replaceChildren();
  if (state === "done") actions.append(button("Show", () => show(job)));
  if (state === "failed") actions.append(button("Retry", () => { job.state = "waiting"; pump(); }));
}

function button(label, onClick) {
  const b = document.createElement("button");
  b.type = "button";
  b.textContent = label;
  b.addEventListener("click", onClick);
  return b;
}

async function pump() {
  if (busy) return;
  busy = true;
  let job;
  while ((job = jobs.find((j) => j.state === "waiting"))) await run(job);
  busy = false;
}

async function run(job) {
  const started = performance.now();
  setStatus(job, "uploading", "Uploading…", 0);
  try {
    const { blob, name } = await send(job);
    job.name = name;
    job.resultUrl = URL.createObjectURL(blob);
    const img = await loaded(job.resultUrl);
    job.width = img.naturalWidth;
    job.height = img.naturalHeight;
    const seconds = ((performance.now() - started) / 1000).toFixed(1);
    setStatus(job, "done", `Done: ${job.width / job.scale}×${job.height / job.scale} → ${job.width}×${job.height} in ${seconds} s`, 100);
    show(job);
  } catch (err) {
    setStatus(job, "failed", err.message, 0);
    showError(`${job.file.name}: ${err.message}`);
  }
}

function send(job) {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open("POST", "/api/upscale");
    xhr.responseType = "blob";
    xhr.upload.addEventListener("progress", (e) => {
      if (e.lengthComputable) setStatus(job, "uploading", `Uploading ${Math.round((100 * e.loaded) / e.total)}%`, (50 * e.loaded) / e.total);
    });
    xhr.upload.addEventListener("load", () => setStatus(job, "working", `Upscaling ×${job.scale}…`, null));
    xhr.addEventListener("load", async () => {
      if (xhr.status === 200) {
        const match = /filename="([^"]+)"/.exec(xhr.getResponseHeader("Content-Disposition") || "");
        resolve({ blob: xhr.response, name: match ? match[1] : `upscaled_x${job.scale}.${job.format}` });
      } else {
        reject(new Error(await apiError(xhr.response, xhr.status)));
      }
    });
    xhr.addEventListener("error", () => reject(new Error("the server could not be reached; is a2n serve still running?")));
    const form = new FormData();
    form.append("file", job.file, job.file.name);
    form.append("scale", String(job.scale));
    form.append("format", job.format);
    form.append("ensemble", String(job.ensemble));
    xhr.send(form);
  });
}

async function apiError(blob, status) {
  const text = blob ? await blob.text() : "";
  try {
    return `${JSON.parse(text).error} (HTTP ${status})`;
  } catch {
    return `the server answered HTTP ${status}: ${text.slice(0, 200) || "no details"}`;
  }
}

function loaded(url) {
  return new Promise((resolve, reject) => {
    const img = new Image();
    img.addEventListener("load", () => resolve(img));
    img.addEventListener("error", () => reject(new Error("the browser cannot display the result")));
    img.src = url;
  });
}

function show(job) {
  if (shown) shown.el.classList.remove("selected");
  shown = job;
  job.el.classList.add("selected");
  $("viewer").hidden = false;
  $("viewer-title").textContent = `${job.file.name}: ${job.width / job.scale}×${job.height / job.scale} → ${job.width}×${job.height}`;
  $("after").src = job.resultUrl;
  $("before").src = job.sourceUrl;
  $("after-label").textContent = `after (${job.ensemble ? "a2n+" : "a2n"} ×${job.scale}) ▶`;
  $("download").href = job.resultUrl;
  $("download").download = job.name;
  setDivider(50);
  setZoom(1);
}

function setDivider(percent) {
  const d = Math.min(100, Math.max(0, percent));
  $("before").style.clipPath = `inset(0 ${100 - d}% 0 0)`;
  $("handle").style.left = `${d}%`;
  $("divider").value = String(Math.round(d));
}

function fitScale() {
  const viewport = $("viewport");
  const height = window.innerHeight * 0.7;
  return Math.min(viewport.clientWidth / shown.width, height / shown.height);
}

// Zoom keeping the image point under (x, y) of the viewport (default: its centre) in place.
function setZoom(level, x, y) {
  if (!shown) return;
  const viewport = $("viewport");
  const stage = $("stage");
  const cx = x ?? viewport.clientWidth / 2;
  const cy = y ?? viewport.clientHeight / 2;
  const fx = stage.offsetWidth ? (viewport.scrollLeft + cx - stage.offsetLeft) / stage.offsetWidth : 0.5;
  const fy = stage.offsetHeight ? (viewport.scrollTop + cy - stage.offsetTop) / stage.offsetHeight : 0.5;
  zoom = Math.min(8, Math.max(1, Math.round(level)));
  const s = fitScale() * zoom;
  stage.style.width = `${Math.round(shown.width * s)}px`;
  stage.style.height = `${Math.round(shown.height * s)}px`;
  stage.classList.toggle("zoomed", zoom > 1);
  $("zoom").value = String(zoom);
  $("zoom-value").textContent = `${zoom}×`;
  viewport.scrollLeft = fx * stage.offsetWidth + stage.offsetLeft - cx;
  viewport.scrollTop = fy * stage.offsetHeight + stage.offsetTop - cy;
}

function setupViewer() {
  const stage = $("stage");
  const viewport = $("viewport");
  let dragging = false;
  const follow = (e) => {
    const r = stage.getBoundingClientRect();
    setDivider((100 * (e.clientX - r.left)) / r.width);
  };
  stage.addEventListener("pointerdown", (e) => { dragging = true; stage.setPointerCapture(e.pointerId); follow(e); });
  stage.addEventListener("pointermove", (e) => { if (dragging) follow(e); });
  stage.addEventListener("pointerup", () => { dragging = false; });
  stage.addEventListener("dblclick", (e) => {
    const r = viewport.getBoundingClientRect();
    setZoom(zoom * 2 > 8 ? 1 : zoom * 2, e.clientX - r.left, e.clientY - r.top);
  });
  viewport.addEventListener("keydown", (e) => {
    const keys = { "+": zoom + 1, "=": zoom + 1, "-": zoom - 1, "0": 1 };
    if (e.key in keys) {
      e.preventDefault();
      setZoom(keys[e.key]);
    }
  });
  $("divider").addEventListener("input", (e) => setDivider(Number(e.target.value)));
  $("zoom").addEventListener("input", (e) => setZoom(Number(e.target.value)));
  window.addEventListener("resize", () => setZoom(zoom));
}

function setupInput() {
  const drop = $("drop");
  $("choose").addEventListener("click", () => $("file").click());
  $("file").addEventListener("change", (e) => {
    addFiles([...e.target.files]);
    e.target.value = "";
  });
  window.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  window.addEventListener("dragleave", (e) => { if (!e.relatedTarget) drop.classList.remove("over"); });
  window.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    addFiles([...e.dataTransfer.files]);
  });
}

setupInput();
setupViewer();
loadHealth();
