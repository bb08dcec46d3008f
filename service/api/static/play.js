// /play: a WebSocket session with the world model. Keys map to the model's discrete actions; every frame
// drawn after the start frame is the model's prediction. Protocol: see service/api/ws.py.
// With API keys configured (and auth.public_docs for the page itself), open /play#key=<key>: the key is kept
// in this tab's sessionStorage, sent as a Bearer header to /v1/models and as a WebSocket subprotocol
// (`bearer.<key>`, next to `worldserve.v1`), since browsers cannot set headers on a WebSocket.
"use strict";

const API_KEY = (() => {
  const m = location.hash.match(/key=([^&]+)/);
  if (m) {
    sessionStorage.setItem("worldserveKey", decodeURIComponent(m[1]));
    history.replaceState(null, "", location.pathname + location.search);  // the key leaves the URL, ?model= stays
  }
  return sessionStorage.getItem("worldserveKey");
})();
const AUTH_HEADERS = API_KEY ? { authorization: `Bearer ${API_KEY}` } : {};
const WS_PROTOCOLS = API_KEY ? ["worldserve.v1", `bearer.${API_KEY}`] : [];

const KEYS = { ArrowLeft: 0, a: 0, A: 0, ArrowRight: 1, d: 1, D: 1, ArrowUp: 2, w: 2, W: 2 };
const MAX_IN_FLIGHT = 2; // actions sent but not yet answered; more key presses are dropped, not queued
const FPS_WINDOW_MS = 2000;

const $ = (id) => document.getElementById(id);
const canvas = $("screen");
const g = canvas.getContext("2d");
g.imageSmoothingEnabled = false;

let ws = null;
let ready = false;
let inFlight = []; // send times (ms) of unanswered actions
let received = []; // arrival times (ms) of recent frames
let latencies = [];
let startFile = null;
let generation = 0; // bumps on every restart; stale callbacks check it
let drawing = Promise.resolve(); // frames are drawn in arrival order

function setStatus(text, error = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", error);
}

function b64ToBytes(b64) {
  const s = atob(b64);
  const out = new Uint8Array(s.length);
  for (let i = 0; i < s.length; i++) out[i] = s.charCodeAt(i);
  return out;
}

function bytesToB64(bytes) {
  let s = "";
  for (let i = 0; i < bytes.length; i += 0x8000) s += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  return btoa(s);
}

async function drawPng(b64) {
  const bmp = await createImageBitmap(new Blob([b64ToBytes(b64)], { type: "image/png" }));
  g.drawImage(bmp, 0, 0, canvas.width, canvas.height);
}

function draw(b64, step) {
  drawing = drawing.then(() => drawPng(b64)).then(() => { canvas.dataset.step = String(step); });
  return drawing;
}

async function openSession() {
  const gen = ++generation;
  if (ws) { ws.onclose = null; ws.close(); }
  ws = null; ready = false; inFlight = []; received = []; latencies = [];
  for (const id of ["step", "reward", "done", "fps", "latency"]) $(id).textContent = "-";
  const model = $("model").value;
  if (!model || !startFile) return;
  setStatus("connecting");
  const data = bytesToB64(new Uint8Array(await (await fetch(`/static/starts/${startFile}`)).arrayBuffer()));
  if (gen !== generation) return;
  await draw(data, -1);
  const proto = location.protocol === "https:" ? "wss" : "ws";
  const sock = new WebSocket(`${proto}://${location.host}/v1/models/${encodeURIComponent(model)}/session`,
    WS_PROTOCOLS);
  ws = sock;
  sock.onopen = () => sock.send(JSON.stringify({
    type: "open", context: [{ encoding: "png", data }], options: { frame_encoding: "png", frames: "all" },
  }));
  sock.onmessage = (e) => { if (gen === generation) onMessage(JSON.parse(e.data)); };
  sock.onerror = () => { if (gen === generation) setStatus("connection error", true); };
  sock.onclose = () => { if (gen === generation) { ready = false; if (!$("status").classList.contains("error")) setStatus("closed"); } };
}

function onMessage(m) {
  if (m.type === "opened") {
    ready = true;
    canvas.dataset.session = m.session_id;
    setStatus("ready");
    pump();
  } else if (m.type === "error") {
    inFlight.shift();
    setStatus(`${m.code}: ${m.message}`, true);
  } else if (m.type === "frame") {
    const now = performance.now();
    const sent = inFlight.shift();
    if (sent !== undefined) latencies.push(now - sent);
    if (latencies.length > 50) latencies.shift();
    received.push(now);
    $("step").textContent = String(m.step);
    $("reward").textContent = Number(m.reward).toFixed(3);
    $("done").textContent = Number(m.done).toFixed(2) + (m.done > 0.5 ? " (episode over)" : "");
    $("latency").textContent = `${(latencies.reduce((a, b) => a + b, 0) / latencies.length).toFixed(0)} ms`;
    draw(m.frame.data, m.step);
    updateFps();
    pump();
  }
}

function send(action) {
  if (!ready || !ws || ws.readyState !== WebSocket.OPEN || inFlight.length >= MAX_IN_FLIGHT) return false;
  inFlight.push(performance.now());
  ws.send(JSON.stringify({ type: "action", action }));
  return true;
}

function pump() { // autoplay keeps MAX_IN_FLIGHT random actions in flight: the achievable frames/s
  while ($("auto").checked && send(Math.floor(Math.random() * 3))) { /* fill the pipeline */ }
}

function updateFps() {
  const now = performance.now();
  while (received.length && now - received[0] > FPS_WINDOW_MS) received.shift();
  if (received.length < 2) { $("fps").textContent = received.length ? "-" : "0"; return; }
  const span = (received[received.length - 1] - received[0]) / 1000;
  $("fps").textContent = span > 0 ? ((received.length - 1) / span).toFixed(1) : "-";
}

document.addEventListener("keydown", (e) => {
  if (!(e.key in KEYS) || e.target instanceof HTMLSelectElement || e.target instanceof HTMLInputElement) return;
  e.preventDefault();
  send(KEYS[e.key]);
});
for (const b of document.querySelectorAll("button[data-action]")) {
  b.addEventListener("click", () => send(Number(b.dataset.action)));
}
$("restart").addEventListener("click", openSession);
$("model").addEventListener("change", () => { showStarts($("model").value); openSession(); });
$("auto").addEventListener("change", pump);
setInterval(updateFps, 500);

// Start frames per world (static/starts/index.json, written by `python -m worldserve.lab.starts`): a model starts
// from frames of the world it was trained on. Its world: the model info's `world` where the API serves one, else
// the index's map of shipped models, else the index's default world.
let startIndex = null;
const modelWorlds = {};

function worldOf(model) {
  const w = modelWorlds[model] || startIndex.models[model];
  return w && startIndex.worlds[w] ? w : startIndex.default;
}

function showStarts(model) {
  const world = worldOf(model);
  const list = startIndex.worlds[world];
  $("starts").replaceChildren();
  $("starts").dataset.world = world;
  for (const s of list) {
    const img = new Image();
    img.src = `/static/starts/${s.file}`;
    img.alt = img.title = `${world} layout seed ${s.seed}`;
    img.addEventListener("click", () => {
      for (const o of document.querySelectorAll(".starts img")) o.classList.remove("chosen");
      img.classList.add("chosen");
      startFile = s.file;
      openSession();
    });
    $("starts").append(img);
  }
  document.querySelector(".starts img").classList.add("chosen");
  startFile = list[0].file;
}

async function init() {
  try {
    const models = (await (await fetch("/v1/models", { headers: AUTH_HEADERS })).json()).models
      .filter((m) => m.action_dim === 0);
    if (!models.length) { setStatus("no discrete-action model is served", true); return; }
    for (const m of models) {
      $("model").add(new Option(`${m.name} (${m.action_names.join("/")})`, m.name));
      if (m.world) modelWorlds[m.name] = m.world;
    }
    const wanted = new URLSearchParams(location.search).get("model");  // /play?model=NAME picks the model
    if (wanted && models.some((m) => m.name === wanted)) $("model").value = wanted;
    startIndex = await (await fetch("/static/starts/index.json")).json();
    showStarts($("model").value);
    await openSession();
  } catch (err) {
    setStatus(String(err), true);
  }
}

init();
