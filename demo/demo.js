"use strict";
// The page of demo.py: pick a first frame, draw each object's path, ask the
// server for the clip (POST /api/generate, sample.py's code path) and show it.

const $ = (id) => document.getElementById(id);
const ID_COLORS = ["#ff0000", "#00ff00", "#0000ff", "#ffff00", "#ff00ff", "#00ffff"];  // video.ID_COLORS
const GALLERY = 6;  // clips kept side by side
const state = {
  info: null,       // /api/info: clip size and frames, methods, example scenes
  scene: null,      // the scene file's JSON, as loaded
  objects: [],      // per object: its box [x0, y0, x1, y1] and centre [x, y] in the first frame
  paths: [],        // per object: the drawn path (points in pixels, from its centre) or null: it stays
  selected: null,   // the object the presets apply to
  drawing: false,
  image: null,      // the first frame
  lastScene: null, lastGif: null, lastSeconds: null, clickToClip: null, clips: 0,  // the last clip (read by the tests)
};
window.demo = state;

async function api(path, body) {
  const options = body === undefined ? {} :
    {method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)};
  const response = await fetch(path, options);
  if (!response.ok) {
    let message = `${response.status} ${response.statusText}`;
    try { message = (await response.json()).error; } catch (e) { /* not JSON: keep the status */ }
    throw new Error(message);
  }
  return response;
}

function status(text, error = false) {
  $("status").textContent = text;
  $("status").className = error ? "error" : "";
}

// ------------------------------------------------------------ the first frame

async function load(scene) {
  const answer = await (await api("/api/first_frame", {scene})).json();
  const image = new Image();
  image.src = answer.image;
  await image.decode();
  Object.assign(state, {scene, image, objects: answer.objects, paths: answer.objects.map(() => null), selected: null});
  draw();
  status("");
}

function draw() {
  const canvas = $("canvas"), context = canvas.getContext("2d"), s = canvas.width / state.info.size;
  context.imageSmoothingEnabled = false;
  context.clearRect(0, 0, canvas.width, canvas.height);
  if (state.image) context.drawImage(state.image, 0, 0, canvas.width, canvas.height);
  state.objects.forEach((object, k) => {
    const color = object.free ? "#888888" : ID_COLORS[k % ID_COLORS.length], [x0, y0, x1, y1] = object.box;
    const path = state.paths[k];
    context.strokeStyle = context.fillStyle = color;
    context.setLineDash(k === state.selected ? [] : [6, 4]);
    context.lineWidth = k === state.selected ? 3 : 1.5;
    context.strokeRect(x0 * s, y0 * s, (x1 - x0) * s, (y1 - y0) * s);
    if (!path || path.length < 2) return;
    context.setLineDash([]);
    context.lineWidth = 3;
    context.beginPath();
    path.forEach(([x, y], i) => (i ? context.lineTo(x * s, y * s) : context.moveTo(x * s, y * s)));
    context.stroke();
    const [ex, ey] = path[path.length - 1];
    context.beginPath();
    context.arc(ex * s, ey * s, 6, 0, 2 * Math.PI);
    context.fill();
  });
  $("selected").textContent = state.selected === null ? "Click an object to pick it." :
    `Object ${state.selected + 1} picked; its path:`;
}

// ----------------------------------------------------------------- drawing

const round = (v) => Math.round(v * 100) / 100;
const inFrame = (v) => round(Math.min(state.info.size, Math.max(0, v)));

function pointOf(event) {  // the pointer in the clip's pixels
  const rect = $("canvas").getBoundingClientRect(), s = rect.width / state.info.size;
  return [inFrame((event.clientX - rect.left) / s), inFrame((event.clientY - rect.top) / s)];
}

function objectAt([x, y]) {  // the front-most controlled object whose first-frame box holds the point
  for (let k = state.objects.length - 1; k >= 0; k--) {
    if (state.objects[k].free) continue;  // a free object moves on its own
    const [x0, y0, x1, y1] = state.objects[k].box;
    if (x >= x0 - 1 && x <= x1 + 1 && y >= y0 - 1 && y <= y1 + 1) return k;
  }
  return null;
}

function startPath(event) {
  const k = objectAt(pointOf(event));
  if (k === null) return;
  Object.assign(state, {selected: k, drawing: true});
  state.paths[k] = [state.objects[k].center.slice()];
  $("canvas").setPointerCapture(event.pointerId);
  draw();
}

function extendPath(event) {
  if (!state.drawing) return;
  const path = state.paths[state.selected], point = pointOf(event), last = path[path.length - 1];
  if (Math.hypot(point[0] - last[0], point[1] - last[1]) >= 0.5) {
    path.push(point);
    draw();
  }
}

function endPath() {
  if (!state.drawing) return;
  state.drawing = false;
  if (state.paths[state.selected].length < 2) state.paths[state.selected] = null;  // a click only picks
  draw();
}

const steps = (n) => Array.from({length: n}, (_, i) => i);
// Preset paths from an object's centre c in a frame of side S, heading for the larger free side.
const PRESETS = {
  line: (c, S) => {
    let end = [S - c[0], S - c[1]];  // through the middle to the other side
    if (Math.hypot(end[0] - c[0], end[1] - c[1]) < S / 4) end = [c[0] + (c[0] < S / 2 ? S / 3 : -S / 3), c[1]];
    return [c, end];
  },
  arc: (c, S) => {
    const r = S / 4, dx = c[0] < S / 2 ? 1 : -1, dy = c[1] < S / 2 ? 1 : -1;
    return steps(9).map((i) => [c[0] + dx * r * (1 - Math.cos(Math.PI * i / 8)), c[1] + dy * r * Math.sin(Math.PI * i / 8)]);
  },
  zigzag: (c, S) => {
    const dx = c[0] < S / 2 ? 1 : -1, dy = c[1] < S / 2 ? 1 : -1;
    return steps(5).map((i) => [c[0] + dx * i * S / 8, c[1] + (i % 2) * dy * S / 8]);
  },
  circle: (c, S) => {
    const r = S / 5, dx = c[0] < S / 2 ? 1 : -1;
    return steps(17).map((i) => [c[0] + dx * r * (1 - Math.cos(Math.PI * i / 8)), c[1] + r * Math.sin(Math.PI * i / 8)]);
  },
};

function preset(name) {
  if (state.selected === null) return status("Click an object first, then a preset.", true);
  const center = state.objects[state.selected].center;
  state.paths[state.selected] = PRESETS[name](center, state.info.size).map((p) => p.map(inFrame));
  draw();
}

// ------------------------------------------------------- the scene to send

function resample(path, count) {  // `count` points at constant speed along a polyline (data.resample_polyline)
  const arc = [0];
  for (let i = 1; i < path.length; i++) arc.push(arc[i - 1] + Math.hypot(path[i][0] - path[i - 1][0], path[i][1] - path[i - 1][1]));
  const total = arc[arc.length - 1];
  if (total === 0) return steps(count).map(() => path[0]);
  return steps(count).map((t) => {
    const target = total * t / (count - 1);
    let i = 0;
    while (i < path.length - 2 && arc[i + 1] < target) i++;
    const u = arc[i + 1] > arc[i] ? (target - arc[i]) / (arc[i + 1] - arc[i]) : 0;
    return [path[i][0] + u * (path[i + 1][0] - path[i][0]), path[i][1] + u * (path[i + 1][1] - path[i][1])];
  });
}

function boxesAlong(box, center, path, frames) {  // a user-image scene: the first box carried along the path
  const S = state.info.size;
  return resample(path, frames).map(([x, y]) => {
    let dx = x - center[0], dy = y - center[1];
    dx = Math.min(Math.max(dx, -box[0]), S - box[2]);  // the box stays in the frame
    dy = Math.min(Math.max(dy, -box[1]), S - box[3]);
    return [round(box[0] + dx), round(box[1] + dy), round(box[2] + dx), round(box[3] + dy)];
  });
}

function sceneToSend() {
  const scene = JSON.parse(JSON.stringify(state.scene));
  scene.objects.forEach((object, k) => {
    const {box, center, free} = state.objects[k], path = state.paths[k] || [center];
    if (free) return;  // it keeps the scene's own path
    if ("first_frame" in scene) object.boxes = boxesAlong(box, center, path, state.info.frames);
    else object.path = path.map((p) => p.map(round));
  });
  return scene;
}

function sceneOwnPaths() {
  state.paths = state.scene.objects.map((object) => object.path ? object.path.map((p) => p.slice()) :
    object.boxes.map(([x0, y0, x1, y1]) => [(x0 + x1) / 2, (y0 + y1) / 2]));
  draw();
}

// ---------------------------------------------------------------- the clip

async function generate() {
  const method = $("method").value, seed = parseInt($("seed").value || "0", 10), boxes = $("boxes").checked;
  const scene = sceneToSend(), start = performance.now(), bar = $("progress");
  $("go").disabled = true;
  bar.value = 0;
  bar.hidden = false;
  status(`${method}: generating...`);
  const poll = setInterval(async () => {
    try {
      const p = await (await api("/api/progress")).json();
      if (p.method === method && p.total) bar.value = p.done / p.total;
    } catch (e) { /* the next poll will tell */ }
  }, 100);
  try {
    const response = await api("/api/generate", {scene, method, seed, boxes});
    const seconds = parseFloat(response.headers.get("X-Seconds"));
    const gif = await response.blob(), url = URL.createObjectURL(gif);
    $("clip").src = url;
    await $("clip").decode();
    const total = (performance.now() - start) / 1000;
    Object.assign(state, {lastScene: scene, lastGif: gif, lastSeconds: seconds, clickToClip: total, clips: state.clips + 1});
    status(`${method}, seed ${seed}: ${seconds.toFixed(2)} s to generate, ${total.toFixed(2)} s from the click to the clip`);
    offerDownloads(scene, url);
    keep(url, `${method}, seed ${seed}: ${seconds.toFixed(2)} s`);
  } catch (e) {
    status(`${method}: ${e.message}`, true);
  } finally {
    clearInterval(poll);
    bar.hidden = true;
    $("go").disabled = false;
  }
}

function offerDownloads(scene, gifUrl) {
  const sceneLink = $("download-scene"), gifLink = $("download-gif");
  if (sceneLink.href) URL.revokeObjectURL(sceneLink.href);
  sceneLink.href = URL.createObjectURL(new Blob([JSON.stringify(scene, null, 1)], {type: "application/json"}));
  gifLink.href = gifUrl;
  sceneLink.hidden = gifLink.hidden = false;
}

function keep(url, caption) {  // the last clips, newest first, side by side with their times
  const figure = document.createElement("figure"), image = document.createElement("img"), text = document.createElement("figcaption");
  image.src = url;
  text.textContent = caption;
  figure.append(image, text);
  $("gallery").prepend(figure);
  while ($("gallery").children.length > GALLERY) $("gallery").lastChild.remove();
}

// ---------------------------------------------------------------- the page

async function init() {
  state.info = await (await api("/api/info")).json();
  for (const {name, nfe} of state.info.methods) {
    $("method").add(new Option(`${name} (${nfe} network calls)`, name, false, name === state.info.default));
  }
  for (const name of Object.keys(state.info.scenes)) $("scene-file").add(new Option(name, name, false, name === "default"));
  const guard = (action) => async (...args) => { try { await action(...args); } catch (e) { status(e.message, true); } };
  $("scene-file").addEventListener("change", guard(() => load(state.info.scenes[$("scene-file").value])));
  $("random").addEventListener("click", guard(async () =>
    load(await (await api("/api/random_scene", {seed: parseInt($("scene-seed").value || "0", 10)})).json())));
  $("upload").addEventListener("change", guard(async () => {
    const file = $("upload").files[0];
    if (!file) return;
    let scene;
    try { scene = JSON.parse(await file.text()); } catch (e) { throw new Error(`${file.name}: not valid JSON (${e.message})`); }
    await load(scene);
  }));
  const canvas = $("canvas");
  canvas.addEventListener("pointerdown", startPath);
  canvas.addEventListener("pointermove", extendPath);
  canvas.addEventListener("pointerup", endPath);
  canvas.addEventListener("pointercancel", endPath);
  document.querySelectorAll("[data-preset]").forEach((b) => b.addEventListener("click", () => preset(b.dataset.preset)));
  $("clear").addEventListener("click", () => { if (state.selected !== null) state.paths[state.selected] = null; draw(); });
  $("clear-all").addEventListener("click", () => { state.paths = state.paths.map(() => null); draw(); });
  $("file-paths").addEventListener("click", sceneOwnPaths);
  $("go").addEventListener("click", generate);
  const first = state.info.scenes.default ? "default" : Object.keys(state.info.scenes)[0];
  if (first) await load(state.info.scenes[first]);
  else await load(await (await api("/api/random_scene", {seed: 0})).json());
}

init().catch((e) => status(e.message, true));
