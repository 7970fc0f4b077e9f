// densevit explorer page: draws what the server computes and routes clicks. No outside resources.
"use strict";

const $ = (id) => document.getElementById(id);
const S = { meta: null, images: [], mode: "similarity", click: null, result: null, inflight: 0, seq: 0 };

// ------------------------------------------------------------------ colour map (turbo, polynomial fit)
function turbo(t) {
  t = Math.min(1, Math.max(0, t));
  const r = 0.13572138 + t * (4.61539260 + t * (-42.66032258 + t * (132.13108234 + t * (-152.94239396 + t * 59.28637943))));
  const g = 0.09140261 + t * (2.19418839 + t * (4.84296658 + t * (-14.18503333 + t * (4.27729857 + t * 2.82956604))));
  const b = 0.10667330 + t * (12.64194608 + t * (-60.58204836 + t * (110.36276771 + t * (-89.90310912 + t * 27.34824973))));
  const c = (v) => Math.round(255 * Math.min(1, Math.max(0, v)));
  return [c(r), c(g), c(b)];
}
const LUT = Array.from({ length: 256 }, (_, i) => turbo(i / 255));

// ------------------------------------------------------------------ server calls
async function api(path, body, isForm) {
  S.inflight++;
  showProgress();
  try {
    const opts = body === undefined ? {} : isForm ? { method: "POST", body } :
      { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) };
    const res = await fetch(path, opts);
    let data;
    try { data = await res.json(); } catch (e) { data = { error: `server answered ${res.status} without a message` }; }
    if (!res.ok) throw new Error(data.error || `server error ${res.status}`);
    return data;
  } finally {
    S.inflight--;
    showProgress();
  }
}

let progressTimer = null;
function showProgress() {
  const box = $("progress");
  if (S.inflight > 0) {
    document.body.dataset.state = "busy";
    if (!progressTimer) {
      progressTimer = setInterval(async () => {
        try {
          const p = await (await fetch("/api/progress")).json();
          if (S.inflight <= 0) return;
          const more = p.queued > 0 ? ` · ${p.queued} more request(s) queued` : "";
          $("progress-text").textContent = (p.busy ? p.message : "computing…") + more;
          box.hidden = false;
        } catch (e) { /* server busy */ }
      }, 250);
    }
  } else {
    clearInterval(progressTimer);
    progressTimer = null;
    box.hidden = true;
    if (document.body.dataset.state === "busy") document.body.dataset.state = "ready";
  }
}

function showError(msg) {
  $("error-text").textContent = msg;
  $("error").hidden = false;
  document.body.dataset.state = "error";
}
function clearError() { $("error").hidden = true; }
function addNote(msg) {
  const d = document.createElement("div");
  d.className = "note";
  d.textContent = msg;
  $("notes").appendChild(d);
}

// ------------------------------------------------------------------ settings
function settings() {
  return {
    layer: +$("layer").value, facet: $("facet").value, bin: $("bin").checked,
    stride: +$("stride").value, load_size: $("load_size").value === "original" ? null : +$("load_size").value,
    upsample: $("upsample").value === "none" ? null : $("upsample").value,
  };
}
function fillSelect(el, values, labels, selected) {
  el.innerHTML = "";
  values.forEach((v, i) => {
    const o = document.createElement("option");
    o.value = v; o.textContent = labels ? labels[i] : v;
    if (String(v) === String(selected)) o.selected = true;
    el.appendChild(o);
  });
}

// ------------------------------------------------------------------ image cards
function displaySize(w, h) {
  const n = S.images.length;
  const maxW = n <= 2 ? 460 : n <= 4 ? 380 : 300, maxH = n <= 2 ? 420 : 320;
  const s = Math.min(maxW / w, maxH / h);
  return [Math.round(w * s), Math.round(h * s)];
}

function buildCards() {
  const box = $("images");
  box.innerHTML = "";
  S.images.forEach((im) => {
    const card = document.createElement("div");
    card.className = "card";
    card.id = `card-${im.index}`;
    const [cw, ch] = displaySize(im.width, im.height);
    im.cw = cw; im.ch = ch;
    card.innerHTML = `<h3><span class="name"></span><span class="muted">${im.width}×${im.height} px</span></h3>`;
    card.querySelector(".name").textContent = im.name;
    const cv = document.createElement("canvas");
    const dpr = window.devicePixelRatio || 1;
    cv.width = Math.round(cw * dpr); cv.height = Math.round(ch * dpr);
    cv.style.width = `${cw}px`; cv.style.height = `${ch}px`;
    cv.className = "view";
    cv.dataset.image = im.index;
    cv.addEventListener("click", (ev) => onClick(im, ev));
    card.appendChild(cv);
    const cap = document.createElement("div");
    cap.className = "caption";
    cap.id = `caption-${im.index}`;
    card.appendChild(cap);
    box.appendChild(card);
    im.canvas = cv;
    im.caption = cap;
    if (!im.img) {
      im.img = new Image();
      im.img.onload = () => drawCard(im);
      im.img.src = `/api/image/${im.index}?v=${im.version}`;
    } else {
      drawCard(im);
    }
  });
}

function onClick(im, ev) {
  const r = im.canvas.getBoundingClientRect();
  const clamp = (v, hi) => Math.min(Math.max(v, 0), hi - 1e-3);
  const x = clamp((ev.clientX - r.left) / r.width * im.width, im.width);
  const y = clamp((ev.clientY - r.top) / r.height * im.height, im.height);
  S.click = { image: im.index, x, y };
  if (S.mode === "saliency" || S.mode === "pca") setMode("similarity");
  refresh();
}

function setMode(m) {
  S.mode = m;
  document.querySelectorAll("input[name=mode]").forEach((el) => { el.checked = el.value === m; });
  $("head-group").style.display = m === "attention" ? "" : "none";
}

// ------------------------------------------------------------------ drawing
function decode(b64) {
  const bin = atob(b64);
  const buf = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) buf[i] = bin.charCodeAt(i);
  return new Float32Array(buf.buffer);
}

function heatCanvas(map, lo, hi) {
  const [h, w] = map.shape;
  const vals = decode(map.values);
  const c = document.createElement("canvas");
  c.width = w; c.height = h;
  const ctx = c.getContext("2d");
  const img = ctx.createImageData(w, h);
  const span = hi > lo ? hi - lo : 1;
  for (let i = 0; i < vals.length; i++) {
    const rgb = LUT[Math.max(0, Math.min(255, Math.round((vals[i] - lo) / span * 255)))];
    img.data[4 * i] = rgb[0]; img.data[4 * i + 1] = rgb[1]; img.data[4 * i + 2] = rgb[2]; img.data[4 * i + 3] = 255;
  }
  ctx.putImageData(img, 0, 0);
  return c;
}

function marker(ctx, kind, x, y, label) {
  const r = 7;
  ctx.save();
  ctx.lineJoin = "round";
  if (kind === "click") {
    ctx.lineWidth = 4; ctx.strokeStyle = "#000";
    ctx.beginPath(); ctx.arc(x, y, r + 1, 0, 2 * Math.PI); ctx.stroke();
    ctx.lineWidth = 2; ctx.strokeStyle = "#fff";
    ctx.beginPath(); ctx.arc(x, y, r + 1, 0, 2 * Math.PI); ctx.stroke();
    for (const [a, b, c, d] of [[0, -r - 7, 0, -r + 1], [0, r - 1, 0, r + 7], [-r - 7, 0, -r + 1, 0], [r - 1, 0, r + 7, 0]]) {
      ctx.lineWidth = 4; ctx.strokeStyle = "#000";
      ctx.beginPath(); ctx.moveTo(x + a, y + b); ctx.lineTo(x + c, y + d); ctx.stroke();
      ctx.lineWidth = 2; ctx.strokeStyle = "#fff";
      ctx.beginPath(); ctx.moveTo(x + a, y + b); ctx.lineTo(x + c, y + d); ctx.stroke();
    }
  } else if (kind === "top") {
    ctx.fillStyle = "#ff2d95"; ctx.strokeStyle = "#fff"; ctx.lineWidth = 1.5;
    ctx.beginPath(); ctx.arc(x, y, r, 0, 2 * Math.PI); ctx.fill(); ctx.stroke();
    ctx.fillStyle = "#fff"; ctx.font = "bold 10px system-ui, sans-serif";
    ctx.textAlign = "center"; ctx.textBaseline = "middle";
    ctx.fillText(label, x, y + 0.5);
  } else if (kind === "buddy") {
    ctx.translate(x, y); ctx.rotate(Math.PI / 4);
    ctx.lineWidth = 5; ctx.strokeStyle = "#000"; ctx.strokeRect(-r - 2, -r - 2, 2 * r + 4, 2 * r + 4);
    ctx.lineWidth = 2.5; ctx.strokeStyle = "#39ff14"; ctx.strokeRect(-r - 2, -r - 2, 2 * r + 4, 2 * r + 4);
  }
  ctx.restore();
}

function drawCard(im) {
  const cv = im.canvas;
  if (!cv || !im.img || !im.img.complete) return;
  const dpr = cv.width / im.cw;
  const ctx = cv.getContext("2d");
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.clearRect(0, 0, im.cw, im.ch);
  ctx.imageSmoothingEnabled = true;
  ctx.drawImage(im.img, 0, 0, im.cw, im.ch);
  const res = S.result;
  const sx = im.cw / im.width, sy = im.ch / im.height;
  if (!res) return;
  const alpha = +$("opacity").value / 100;
  if (res.mode === "pca") {
    const pic = res.pictures && res.pictures[im.index];
    if (pic && pic.complete) {
      ctx.globalAlpha = alpha; ctx.drawImage(pic, 0, 0, im.cw, im.ch); ctx.globalAlpha = 1;
    }
    return;
  }
  const map = res.maps.find((m) => m.image === im.index);
  if (!map) {
    if (res.mode === "attention") { ctx.fillStyle = "rgba(255,255,255,0.55)"; ctx.fillRect(0, 0, im.cw, im.ch); }
    return;
  }
  const [x0, y0, x1, y1] = map.extent;
  ctx.globalAlpha = alpha;
  ctx.drawImage(map.heat, x0 * sx, y0 * sy, (x1 - x0) * sx, (y1 - y0) * sy);
  ctx.globalAlpha = 1;
  if (res.mode === "saliency") return;
  map.topk.slice().reverse().forEach((t, j) => marker(ctx, "top", t.x * sx, t.y * sy, String(map.topk.length - j)));
  if (map.best_buddy) marker(ctx, "buddy", map.best_buddy.x * sx, map.best_buddy.y * sy);
  if (res.source === im.index) marker(ctx, "click", res.clicked.x * sx, res.clicked.y * sy);
}

function drawColorbar(title, lo, hi) {
  const cv = $("colorbar");
  const ctx = cv.getContext("2d");
  for (let i = 0; i < cv.width; i++) {
    const [r, g, b] = LUT[Math.round(i / (cv.width - 1) * 255)];
    ctx.fillStyle = `rgb(${r},${g},${b})`;
    ctx.fillRect(i, 0, 1, cv.height);
  }
  $("colorbar-title").textContent = title;
  const f = (v) => (Math.abs(v) >= 100 || (Math.abs(v) < 0.01 && v !== 0) ? v.toExponential(1) : v.toFixed(3));
  $("cb-lo").textContent = f(lo); $("cb-mid").textContent = f((lo + hi) / 2); $("cb-hi").textContent = f(hi);
  $("colorbar-box").style.visibility = "visible";
}

const fmt = (v) => v.toFixed(1);

function renderResult(res) {
  S.result = res;
  document.querySelectorAll(".card").forEach((c) => c.classList.remove("source"));
  const tbody = $("matches").querySelector("tbody");
  tbody.innerHTML = "";
  $("hint").classList.remove("prompt");
  S.images.forEach((im) => { im.caption.textContent = ""; delete im.caption.dataset.topX; delete im.caption.dataset.topY; });
  $("marker-legend").style.visibility = res.mode === "saliency" || res.mode === "pca" ? "hidden" : "visible";
  $("topk-label").textContent = res.mode === "attention" ? "most attended tokens (1 = most)" : "top-k matches (1 = best)";
  $("buddy-legend").hidden = res.mode === "attention";
  $("details-title").textContent = res.mode === "attention" ? "Most attended tokens" : "Matches";
  $("details").hidden = true;
  if (res.mode === "pca") {
    $("colorbar-box").style.visibility = "hidden";
    $("hint").textContent = "PCA: the first three principal components of all images' descriptors as R, G, B.";
    res.pictures = {};
    let pending = res.images.length;
    const done = () => { if (--pending <= 0) { S.images.forEach(drawCard); rendered(); } };
    if (!pending) { S.images.forEach(drawCard); rendered(); }
    res.images.forEach((p) => {
      const img = new Image();
      img.onload = done; img.onerror = done;
      img.src = `data:image/png;base64,${p.png}`;
      res.pictures[p.image] = img;
    });
    $("timing").textContent = "";
    return;
  }
  let lo, hi, title;
  if (res.mode === "similarity") {
    lo = Math.min(...res.maps.map((m) => m.min)); hi = Math.max(...res.maps.map((m) => m.max));
    title = "cosine similarity to the clicked token (one scale for all images)";
  } else if (res.mode === "attention") {
    lo = 0; hi = Math.max(...res.maps.map((m) => m.max));
    title = `attention of the clicked token, layer ${res.settings.layer}, ${res.head === null ? "mean of heads" : "head " + res.head}`;
  } else {
    lo = 0; hi = 1; title = "CLS-attention saliency (last layer)";
  }
  res.maps.forEach((m) => { m.heat = heatCanvas(m, lo, hi); });
  drawColorbar(title, lo, hi);
  if (res.mode !== "saliency") {
    $(`card-${res.source}`).classList.add("source");
    res.maps.forEach((m) => {
      const im = S.images[m.image];
      const top = m.topk[0];
      const parts = [];
      if (top) {
        parts.push(`${res.mode === "attention" ? "most attended" : m.image === res.source ? "best other match" : "best match"} (${fmt(top.x)}, ${fmt(top.y)}), ${res.mode === "attention" ? "weight" : "sim"} ${top.score.toFixed(3)}`);
        im.caption.dataset.topX = top.x; im.caption.dataset.topY = top.y;
      }
      if (res.mode === "similarity" && m.image !== res.source)
        parts.push(m.best_buddy ? `best buddy (${fmt(m.best_buddy.x)}, ${fmt(m.best_buddy.y)})` : "no best buddy");
      if (res.mode === "attention") parts.push(`attention to CLS ${res.cls_share.toFixed(3)}`);
      im.caption.textContent = parts.join(" · ");
      m.topk.forEach((t, j) => {
        const tr = document.createElement("tr");
        tr.dataset.image = m.image; tr.dataset.rank = j + 1; tr.dataset.x = t.x; tr.dataset.y = t.y;
        tr.innerHTML = `<td></td><td>${j + 1}</td><td>${fmt(t.x)}</td><td>${fmt(t.y)}</td><td>${t.score.toFixed(4)}</td>`;
        tr.firstChild.textContent = im.name;
        tbody.appendChild(tr);
      });
      if (m.best_buddy) {
        const tr = document.createElement("tr");
        tr.className = "bb";
        tr.innerHTML = `<td></td><td>buddy</td><td>${fmt(m.best_buddy.x)}</td><td>${fmt(m.best_buddy.y)}</td><td>${m.best_buddy.score.toFixed(4)}</td>`;
        tr.firstChild.textContent = im.name;
        tbody.appendChild(tr);
      }
    });
    if (res.mode === "attention")
      S.images.forEach((im) => { if (im.index !== res.source) im.caption.textContent = "attention stays within the clicked image"; });
    const c = res.clicked;
    $("hint").textContent = `Clicked ${S.images[res.source].name}: token ${c.token}, centred at (${fmt(c.x)}, ${fmt(c.y)}).`;
    Object.assign($("hint").dataset, { image: res.source, x: c.x, y: c.y, token: c.token });
    $("details").hidden = false;
    $("timing").textContent = res.compute_ms !== undefined ? `server computation ${res.compute_ms.toFixed(1)} ms` : "";
  } else {
    $("hint").textContent = "Saliency: the last layer's CLS attention (min-max per image).";
    $("timing").textContent = "";
  }
  S.images.forEach(drawCard);
  rendered();
}

function rendered() {
  document.body.dataset.renders = String(+document.body.dataset.renders + 1);
  if (S.inflight === 0 && $("error").hidden) document.body.dataset.state = "ready";
}

// ------------------------------------------------------------------ actions
async function refresh() {
  const seq = ++S.seq;
  const s = settings();
  clearError();
  try {
    let res = null;
    if (S.mode === "pca") {
      if (S.images.length) res = await api("/api/pca", { settings: s });
    } else if (S.mode === "saliency") {
      if (S.images.length) res = await api("/api/saliency", { settings: s });
    } else if (S.click) {
      const body = { settings: s, image: S.click.image, x: S.click.x, y: S.click.y, k: +$("k").value };
      if (S.mode === "attention") body.head = $("head").value;
      res = await api(`/api/${S.mode}`, body);
    } else if (S.images.length) {
      await api("/api/prepare", { settings: s });
      $("hint").textContent = "Click any point of any image.";
      $("hint").classList.add("prompt");
      S.result = null;
      S.images.forEach(drawCard);
      rendered();
      return;
    }
    if (seq !== S.seq || !res) return;   // a newer request superseded this one
    renderResult(res);
  } catch (e) {
    if (seq === S.seq) showError(e.message);
  }
}

async function upload(files) {
  if (!files.length) return;
  const form = new FormData();
  for (const f of files) form.append("files", f, f.name);
  clearError();
  try {
    const res = await api("/api/upload", form, true);
    res.notes.forEach(addNote);
    if (res.added.length) {
      const known = new Map(S.images.map((im) => [im.version, im]));
      S.images = res.images.map((d) => Object.assign(known.get(d.version) || {}, d));
      buildCards();
      await refresh();
    }
    if (res.errors.length) showError(res.errors.join(" — "));
  } catch (e) {
    showError(e.message);
  }
  $("upload").value = "";
}

async function save() {
  const cards = S.images.filter((im) => im.canvas);
  if (!cards.length) { showError("nothing to save: no images loaded"); return; }
  const pad = 12, titleH = 26, barH = 54;
  const W = pad + cards.reduce((a, im) => a + im.cw + pad, 0);
  const H = titleH + Math.max(...cards.map((im) => im.ch)) + barH + 2 * pad;
  const out = document.createElement("canvas");
  out.width = W; out.height = H;
  const ctx = out.getContext("2d");
  ctx.fillStyle = "#fff"; ctx.fillRect(0, 0, W, H);
  ctx.fillStyle = "#1d232b"; ctx.font = "bold 13px system-ui, sans-serif"; ctx.textBaseline = "top";
  const s = settings();
  ctx.fillText(`${S.meta.backbone} · ${S.mode} · layer ${s.layer} · ${s.facet}${s.bin ? " (binned)" : ""} · stride ${s.stride}${s.upsample ? " · " + s.upsample : ""} · load ${s.load_size || "original"}`, pad, 8);
  let x = pad;
  for (const im of cards) {
    ctx.drawImage(im.canvas, x, titleH + pad, im.cw, im.ch);
    ctx.font = "12px system-ui, sans-serif";
    ctx.fillText(im.name, x, titleH + pad + im.ch + 4);
    x += im.cw + pad;
  }
  if (S.result && S.result.mode !== "pca") {
    const y = H - barH + 16;
    ctx.drawImage($("colorbar"), pad, y, 240, 12);
    ctx.font = "11px system-ui, sans-serif";
    ctx.fillText(`${$("cb-lo").textContent}`, pad, y + 15);
    ctx.textAlign = "right"; ctx.fillText(`${$("cb-hi").textContent}`, pad + 240, y + 15); ctx.textAlign = "left";
    ctx.fillText($("colorbar-title").textContent, pad + 252, y);
  }
  const body = { png: out.toDataURL("image/png"), mode: S.mode, settings: s, k: +$("k").value, head: $("head").value };
  if (S.click && (S.mode === "similarity" || S.mode === "attention")) Object.assign(body, S.click);
  try {
    const r = await api("/api/save", body);
    addNote(`Saved ${r.png} and ${r.json}`);
  } catch (e) { showError(e.message); }
}

// ------------------------------------------------------------------ start
async function start() {
  try {
    const st = await api("/api/state");
    S.meta = st;
    $("model").textContent = `${st.backbone}${st.weights ? " (" + st.weights + ")" : ""} · patch ${st.patch_size} · ${st.depth} layers · ${st.heads} heads`;
    const d = st.defaults;
    fillSelect($("layer"), [...Array(st.depth).keys()], null, d.layer);
    fillSelect($("facet"), st.facets, null, d.facet);
    fillSelect($("stride"), st.strides, null, d.stride);
    fillSelect($("upsample"), ["none", ...st.upsamplers], null, d.upsample || "none");
    fillSelect($("head"), ["mean", ...Array(st.heads).keys()], ["mean of heads", ...[...Array(st.heads).keys()].map(String)], "mean");
    const ls = $("load_size");
    const want = d.load_size ? String(d.load_size) : "original";
    if (![...ls.options].some((o) => o.value === want)) {
      const o = document.createElement("option"); o.value = want; o.textContent = want; ls.appendChild(o);
    }
    ls.value = want;
    $("bin").checked = d.bin;
    S.images = st.images;
    st.images.forEach((im) => { if (im.note) addNote(im.note); });
    setMode("similarity");
    buildCards();
    if (!S.images.length) $("hint").textContent = "No images yet: add some with “Add images…”.";
    document.body.dataset.state = "ready";
    await refresh();
  } catch (e) { showError(e.message); }
}

document.querySelectorAll("input[name=mode]").forEach((el) => el.addEventListener("change", () => { setMode(el.value); refresh(); }));
["layer", "facet", "bin", "stride", "load_size", "upsample", "head", "k"].forEach((id) => $(id).addEventListener("change", refresh));
$("upsample").addEventListener("change", () => { $("stride").disabled = $("upsample").value !== "none"; });
$("opacity").addEventListener("input", () => S.images.forEach(drawCard));
$("upload").addEventListener("change", (ev) => upload(ev.target.files));
$("save").addEventListener("click", save);
$("error-close").addEventListener("click", clearError);
window.addEventListener("load", start);
