// faceshield web page: upload photos, follow each photo's progress, show before/after with the faces boxed and
// the per-model similarities, offer the results for download. No external code; talks to /api/v1 only.
"use strict";

const API = "/api/v1";
const FORMATS = ["image/jpeg", "image/png", "image/webp", "image/bmp", "image/tiff"];
const state = { token: "", methods: {}, limits: null, files: [], results: [], jobId: null, polling: null };
const $ = (id) => document.getElementById(id);

function setStatus(text, isError = false) {
  const el = $("status");
  el.textContent = text;
  el.classList.toggle("error", isError);
}

async function api(path, options = {}) {
  const headers = Object.assign({}, options.headers || {});
  if (state.token) headers.Authorization = "Bearer " + state.token;
  const response = await fetch(API + path, Object.assign({}, options, { headers }));
  if (response.status === 401) {
    $("token-section").hidden = false;
    $("token").focus();
    throw new Error("This server needs an access token: enter it above.");
  }
  return response;
}

async function errorText(response) {
  try { return (await response.json()).error || response.statusText; } catch (e) { return response.statusText; }
}

async function loadInfo() {
  try {
    const [methods, limits] = await Promise.all([api("/methods"), api("/limits")]);
    if (!methods.ok || !limits.ok) throw new Error(await errorText(methods.ok ? limits : methods));
    state.methods = await methods.json();
    state.limits = await limits.json();
  } catch (e) {
    setStatus(e.message, true);
    return;
  }
  const select = $("method");
  select.replaceChildren();
  for (const [name, info] of Object.entries(state.methods)) {
    const option = new Option(name, name, false, name === "cloak");
    option.title = info.summary;
    select.add(option);
  }
  $("limits-hint").textContent = `JPEG, PNG, WebP, BMP or TIFF · up to ${state.limits.max_upload_mb} MB and ` +
    `${Math.round(state.limits.max_pixels / 1e6)} megapixels each · ${state.limits.max_photos} photos at a time`;
  $("ttl").textContent = `${Math.round(state.limits.ttl_s / 60)} minutes`;
  methodChanged();
}

function methodChanged() {
  const info = state.methods[$("method").value];
  if (!info) return;
  $("strength").disabled = Object.keys(info.strengths || {}).length === 0;
  const show = (v) => Array.isArray(v) ? v.join(",") || "(all)" :
    typeof v === "number" && !Number.isInteger(v) ? String(Number(v.toPrecision(4))) : String(v);
  const allowed = Object.entries(info.defaults).map(([k, v]) =>
    `${k}=${show(v)}` + (info.allowed[k] ? ` (${info.allowed[k]})` : ""));
  const summary = info.summary.replace(/`/g, "").replace(/\.+$/, "");
  $("settings-hint").textContent = `${summary}. Defaults: ` + allowed.join(" · ");
}

function chooseFiles(fileList) {
  const files = Array.from(fileList);
  const problems = [];
  const limits = state.limits;
  state.files = files.filter((f) => {
    if (f.type && !FORMATS.includes(f.type)) { problems.push(`${f.name}: unsupported file type`); return false; }
    if (limits && f.size > limits.max_upload_mb * 1e6) {
      problems.push(`${f.name}: too large (over ${limits.max_upload_mb} MB)`); return false;
    }
    return true;
  });
  if (limits && state.files.length > limits.max_photos) {
    problems.push(`only the first ${limits.max_photos} photos are sent`);
    state.files = state.files.slice(0, limits.max_photos);
  }
  const list = $("chosen");
  list.replaceChildren(...state.files.map((f) => Object.assign(document.createElement("li"), { textContent: f.name })));
  if (problems.length) setStatus(problems.join("; "), true);
  else setStatus(state.files.length ? `${state.files.length} photo(s) ready: press "Protect photos".` : "");
}

function makeCard(file, index) {
  const node = $("card-template").content.firstElementChild.cloneNode(true);
  node.querySelector(".name").textContent = file.name;
  const label = node.querySelector(".progress-label");
  const bar = node.querySelector("progress");
  label.id = `progress-label-${index}`;
  bar.setAttribute("aria-labelledby", label.id);
  label.textContent = "Waiting…";
  const before = node.querySelector(".before img");
  before.src = URL.createObjectURL(file);
  before.alt = `${file.name}, original`;
  $("results").append(node);
  return node;
}

function drawBoxes(card, photo) {
  for (const frame of card.querySelectorAll(".frame")) {
    frame.querySelectorAll(".box").forEach((b) => b.remove());
    photo.boxes.forEach((box, i) => {
      const [x0, y0, x1, y1] = box;
      const div = document.createElement("div");
      div.className = "box";
      div.style.left = `${(100 * x0) / photo.width}%`;
      div.style.top = `${(100 * y0) / photo.height}%`;
      div.style.width = `${(100 * (x1 - x0)) / photo.width}%`;
      div.style.height = `${(100 * (y1 - y0)) / photo.height}%`;
      div.setAttribute("aria-hidden", "true");
      const tag = document.createElement("span");
      tag.textContent = `face ${i + 1}`;
      div.append(tag);
      frame.append(div);
    });
  }
}

// Cosine similarity −1…1 drawn on 0…100 %; the threshold is a dark tick: a bar ending left of it is fooled.
function drawBars(card, record) {
  const bars = card.querySelector(".bars");
  bars.replaceChildren();
  const pct = (c) => `${Math.max(0, Math.min(100, ((c + 1) / 2) * 100))}%`;
  for (const [model, s] of Object.entries(record.similarity || {})) {
    s.after.forEach((after, face) => {
      const fooled = s.threshold !== null && after <= s.threshold;
      const row = document.createElement("div");
      row.className = "bar-row";
      const name = Object.assign(document.createElement("span"), { className: "bar-name",
        textContent: `${model}${s.after.length > 1 ? ` · face ${face + 1}` : ""}` });
      const bar = document.createElement("div");
      bar.className = "bar";
      bar.setAttribute("role", "img");
      const limit = s.threshold === null ? "no threshold" : `threshold ${s.threshold.toFixed(2)}`;
      const words = `similarity to the original ${after.toFixed(2)} (${limit}): ` +
        (fooled ? "fooled" : "still recognises the face");
      bar.setAttribute("aria-label", `${model}: ${words}`);
      const fill = Object.assign(document.createElement("div"), { className: "fill" + (fooled ? "" : " unfooled") });
      fill.style.width = pct(after);
      bar.append(fill);
      if (s.threshold !== null) {
        const tick = Object.assign(document.createElement("div"), { className: "threshold", title: "threshold" });
        tick.style.left = pct(s.threshold);
        bar.append(tick);
      }
      const text = Object.assign(document.createElement("span"), { className: "bar-text",
        textContent: `before ${s.before[face].toFixed(2)} → after: ${words}` });
      row.append(name, bar, text);
      bars.append(row);
    });
  }
}

async function finishPhoto(card, photo) {
  const record = photo.record || {};
  card.dataset.status = photo.status;
  card.querySelector("progress").value = 100;
  card.querySelector(".progress-label").textContent = "Done";
  card.querySelector(".verdict").textContent = record.summary || photo.status;
  drawBoxes(card, photo);
  drawBars(card, record);
  if (!photo.result_available) return;
  const response = await api(`/jobs/${state.jobId}/photos/${photo.index}/result`);
  if (!response.ok) {
    card.querySelector(".verdict").textContent += ` (download failed: ${await errorText(response)})`;
    return;
  }
  // The server deletes the result once downloaded: the page keeps it in memory for the preview and downloads.
  const blob = await response.blob();
  const url = URL.createObjectURL(blob);
  const after = card.querySelector(".after img");
  after.src = url;
  after.alt = `${photo.name}, protected`;
  state.results.push({ name: photo.result_name, blob });
  const link = Object.assign(document.createElement("a"), { className: "button", href: url,
    download: photo.result_name, textContent: `Download ${photo.result_name}` });
  card.querySelector(".download-row").replaceChildren(link);
  $("zip").disabled = false;
}

async function poll(cards) {
  const done = new Set();
  while (true) {
    const response = await api(`/jobs/${state.jobId}`);
    if (!response.ok) throw new Error(await errorText(response));
    const job = await response.json();
    for (const photo of job.photos) {
      const card = cards[photo.index];
      if (done.has(photo.index)) continue;
      if (photo.status === "queued" || photo.status === "running") {
        card.querySelector("progress").value = Math.round(photo.progress * 100);
        card.querySelector(".progress-label").textContent = photo.status === "queued" ? "Waiting…" :
          photo.total ? `Protecting: step ${photo.step} of ${photo.total}` : "Finding faces…";
        card.dataset.status = photo.status;
        if (photo.boxes.length) drawBoxes(card, photo);
      } else {
        done.add(photo.index);
        await finishPhoto(card, photo);
      }
    }
    const counts = job.counts;
    if (job.state !== "queued" && job.state !== "running") {
      setStatus(`Finished: ${counts.protected} protected, ${counts.weak} weak, ${counts["no-face"]} without a ` +
        `face, ${counts.failed} failed.`);
      return job;
    }
    setStatus(`Working: ${done.size} of ${job.photos.length} photo(s) done…`);
    await new Promise((r) => setTimeout(r, 500));
  }
}

async function submit(event) {
  event.preventDefault();
  if (!state.files.length) { setStatus("Choose at least one photo first.", true); $("photos").focus(); return; }
  const form = new FormData();
  state.files.forEach((f) => form.append("photos", f, f.name));
  const method = $("method").value;
  form.append("method", method);
  if (!$("strength").disabled) form.append("strength", $("strength").value);
  $("settings").value.split("\n").map((s) => s.trim()).filter(Boolean).forEach((s) => form.append("settings", s));
  if ($("target").files.length) form.append("target", $("target").files[0]);
  $("protect").disabled = true;
  setStatus("Uploading…");
  try {
    const response = await api("/jobs", { method: "POST", body: form });
    if (response.status === 429) {
      const wait = response.headers.get("Retry-After");
      throw new Error(`The server is busy; try again in ${wait || "a few"} seconds.`);
    }
    if (!response.ok) throw new Error(await errorText(response));
    const job = await response.json();
    state.jobId = job.id;
    const cards = state.files.map(makeCard);
    setStatus("Uploaded; protecting…");
    await poll(cards);
    await api(`/jobs/${state.jobId}`, { method: "DELETE" });  // nothing of ours stays on the server
  } catch (e) {
    setStatus(e.message, true);
  } finally {
    $("protect").disabled = false;
  }
}

// --- a minimal zip writer (stored, no compression: photos are compressed already) -----------------------------
const CRC_TABLE = (() => {
  const t = new Uint32Array(256);
  for (let n = 0; n < 256; n++) {
    let c = n;
    for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
    t[n] = c >>> 0;
  }
  return t;
})();

function crc32(bytes) {
  let c = 0xffffffff;
  for (let i = 0; i < bytes.length; i++) c = CRC_TABLE[(c ^ bytes[i]) & 0xff] ^ (c >>> 8);
  return (c ^ 0xffffffff) >>> 0;
}

async function makeZip(entries) {
  const enc = new TextEncoder();
  const parts = [], central = [];
  let offset = 0;
  const used = new Set();
  for (const entry of entries) {
    let name = entry.name, n = 2;
    while (used.has(name)) name = entry.name.replace(/(\.[^.]*)?$/, (ext) => `-${n++}${ext}`);
    used.add(name);
    const data = new Uint8Array(await entry.blob.arrayBuffer());
    const nameBytes = enc.encode(name);
    const crc = crc32(data);
    const local = new DataView(new ArrayBuffer(30));
    local.setUint32(0, 0x04034b50, true); local.setUint16(4, 20, true); local.setUint16(6, 0x0800, true);
    local.setUint32(14, crc, true); local.setUint32(18, data.length, true); local.setUint32(22, data.length, true);
    local.setUint16(26, nameBytes.length, true);
    const dir = new DataView(new ArrayBuffer(46));
    dir.setUint32(0, 0x02014b50, true); dir.setUint16(4, 20, true); dir.setUint16(6, 20, true);
    dir.setUint16(8, 0x0800, true); dir.setUint32(16, crc, true); dir.setUint32(20, data.length, true);
    dir.setUint32(24, data.length, true); dir.setUint16(28, nameBytes.length, true); dir.setUint32(42, offset, true);
    parts.push(local, nameBytes, data);
    central.push(dir, nameBytes);
    offset += 30 + nameBytes.length + data.length;
  }
  const size = central.reduce((s, p) => s + p.byteLength, 0);
  const end = new DataView(new ArrayBuffer(22));
  end.setUint32(0, 0x06054b50, true); end.setUint16(8, entries.length, true); end.setUint16(10, entries.length, true);
  end.setUint32(12, size, true); end.setUint32(16, offset, true);
  return new Blob([...parts, ...central, end], { type: "application/zip" });
}

async function downloadZip() {
  if (!state.results.length) return;
  const blob = await makeZip(state.results);
  const a = Object.assign(document.createElement("a"), { href: URL.createObjectURL(blob),
    download: "faceshield-protected.zip" });
  document.body.append(a);
  a.click();
  a.remove();
  setStatus(`Zip of ${state.results.length} photo(s) saved.`);
}

function clearAll() {
  state.files = []; state.results = []; state.jobId = null;
  $("photos").value = ""; $("target").value = "";
  $("chosen").replaceChildren(); $("results").replaceChildren();
  $("zip").disabled = true;
  setStatus("Cleared.");
}

function init() {
  $("photos").addEventListener("change", (e) => chooseFiles(e.target.files));
  $("method").addEventListener("change", methodChanged);
  $("job-form").addEventListener("submit", submit);
  $("zip").addEventListener("click", downloadZip);
  $("clear").addEventListener("click", clearAll);
  $("token-form").addEventListener("submit", (e) => {
    e.preventDefault();
    state.token = $("token").value.trim();
    $("token-section").hidden = true;
    setStatus("");
    loadInfo();
  });
  const drop = $("drop");
  ["dragenter", "dragover"].forEach((t) => drop.addEventListener(t, (e) => {
    e.preventDefault(); drop.classList.add("dragging");
  }));
  ["dragleave", "drop"].forEach((t) => drop.addEventListener(t, () => drop.classList.remove("dragging")));
  drop.addEventListener("drop", (e) => { e.preventDefault(); chooseFiles(e.dataTransfer.files); });
  loadInfo();
}

document.addEventListener("DOMContentLoaded", init);
