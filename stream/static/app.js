// facestream live page: camera -> WebRTC -> server; coefficient messages come back on the
// "coefficients" data channel, the rendered overlay as the returned video track.
"use strict";

const ARKIT = ["eyeBlinkLeft", "eyeLookDownLeft", "eyeLookInLeft", "eyeLookOutLeft", "eyeLookUpLeft",
  "eyeSquintLeft", "eyeWideLeft", "eyeBlinkRight", "eyeLookDownRight", "eyeLookInRight", "eyeLookOutRight",
  "eyeLookUpRight", "eyeSquintRight", "eyeWideRight", "jawForward", "jawLeft", "jawRight", "jawOpen",
  "mouthClose", "mouthFunnel", "mouthPucker", "mouthLeft", "mouthRight", "mouthSmileLeft", "mouthSmileRight",
  "mouthFrownLeft", "mouthFrownRight", "mouthDimpleLeft", "mouthDimpleRight", "mouthStretchLeft",
  "mouthStretchRight", "mouthRollLower", "mouthRollUpper", "mouthShrugLower", "mouthShrugUpper",
  "mouthPressLeft", "mouthPressRight", "mouthLowerDownLeft", "mouthLowerDownRight", "mouthUpperUpLeft",
  "mouthUpperUpRight", "browDownLeft", "browDownRight", "browInnerUp", "browOuterUpLeft", "browOuterUpRight",
  "cheekPuff", "cheekSquintLeft", "cheekSquintRight", "noseSneerLeft", "noseSneerRight", "tongueOut"];

const $ = (id) => document.getElementById(id);
const state = {
  pc: null, channel: null, stream: null, session: null,
  recording: false, recorded: [], messages: 0, arrivals: [], engine: [], latency: [],
  sentAt: new Map(), firstRtp: null, latest: null, drawPending: false,
};
// the test harness reads these
window.facestream = { messages: [], replies: [], videoFrames: 0, state };

// ---------------------------------------------------------------- bars
const fills = {}, vals = {};
for (const name of ARKIT) {
  const row = document.createElement("div");
  row.className = "bar";
  row.innerHTML = `<span>${name}</span><div class="track"><div class="fill"></div></div><span class="val">0</span>`;
  $("bars").appendChild(row);
  fills[name] = row.querySelector(".fill");
  vals[name] = row.querySelector(".val");
}

function draw() {
  state.drawPending = false;
  const m = state.latest;
  if (!m) return;
  $("face").textContent = m.face ? "yes" : "no";
  $("frames").textContent = state.messages;
  if (m.face) {
    for (const name of ARKIT) {
      const v = m.blendshapes[name];
      fills[name].style.width = (100 * v).toFixed(1) + "%";
      vals[name].textContent = v.toFixed(2);
    }
    const e = m.head.euler_deg;
    $("yaw").textContent = e.yaw.toFixed(1);
    $("pitch").textContent = e.pitch.toFixed(1);
    $("roll").textContent = e.roll.toFixed(1);
    $("gaze-l").textContent = `${m.eyes.left.yaw.toFixed(0)}, ${m.eyes.left.pitch.toFixed(0)}`;
    $("gaze-r").textContent = `${m.eyes.right.yaw.toFixed(0)}, ${m.eyes.right.pitch.toFixed(0)}`;
  }
  const now = performance.now();
  state.arrivals = state.arrivals.filter((t) => t > now - 2000);
  $("fps").textContent = (state.arrivals.length / 2).toFixed(1);
  $("engine").textContent = median(state.engine.slice(-60)).toFixed(1);
  $("latency").textContent = state.latency.length ? median(state.latency.slice(-60)).toFixed(0) : "n/a";
}

function median(a) {
  if (!a.length) return NaN;
  const s = [...a].sort((x, y) => x - y);
  return s[Math.floor(s.length / 2)];
}

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

// ---------------------------------------------------------------- messages
function onMessage(ev) {
  const m = JSON.parse(ev.data);
  if (m.type) { onReply(m); return; }
  const now = performance.now();
  state.messages += 1;
  state.arrivals.push(now);
  if (m.timing_ms && m.timing_ms.engine !== undefined) state.engine.push(m.timing_ms.engine);
  // the server's pts is the frame's RTP timestamp relative to the first one it received
  if (state.firstRtp !== null && m.pts !== null) {
    const rtp = (state.firstRtp + Math.round(m.pts)) >>> 0;
    const sent = state.sentAt.get(rtp);
    if (sent !== undefined) { state.latency.push(now - sent); state.sentAt.delete(rtp); }
  }
  if (state.engine.length > 600) { state.engine.splice(0, 300); state.latency.splice(0, Math.max(0, state.latency.length - 300)); }
  if (state.recording) state.recorded.push(ev.data);
  window.facestream.messages.push(m);
  if (window.facestream.messages.length > 1000) window.facestream.messages.splice(0, 500);
  state.latest = m;
  if (!state.drawPending) { state.drawPending = true; requestAnimationFrame(draw); }
}

function onReply(m) {
  window.facestream.replies.push(m);
  if (m.type === "error") setStatus("server: " + m.error, true);
  else if (m.type === "calibration") setStatus(`calibrated ${m.what} (${m.result.frames} frames)`);
}

// ---------------------------------------------------------------- timing of sent frames
// With encoded insertable streams (Chrome), each encoded frame's RTP timestamp is noted as it leaves
// the encoder, so a message can be matched to the moment its frame was sent.
function watchSender(sender) {
  if (!sender.createEncodedStreams) return false;
  const { readable, writable } = sender.createEncodedStreams();
  readable.pipeThrough(new TransformStream({
    transform(frame, ctl) {
      const ts = frame.timestamp >>> 0;
      if (state.firstRtp === null) state.firstRtp = ts;
      state.sentAt.set(ts, performance.now());
      if (state.sentAt.size > 300) state.sentAt.delete(state.sentAt.keys().next().value);
      ctl.enqueue(frame);
    },
  })).pipeTo(writable);
  return true;
}

function passThrough(receiver) {
  if (!receiver.createEncodedStreams) return;
  const { readable, writable } = receiver.createEncodedStreams();
  readable.pipeTo(writable);
}

// ---------------------------------------------------------------- session
async function start() {
  $("start").disabled = true;
  setStatus("asking for the camera...");
  try {
    state.stream = await navigator.mediaDevices.getUserMedia({ video: { width: 640, height: 480 }, audio: false });
  } catch (err) {
    setStatus("camera: " + err.message, true);
    $("start").disabled = false;
    return;
  }
  $("local").srcObject = state.stream;
  const insertable = "createEncodedStreams" in RTCRtpSender.prototype;
  const pc = new RTCPeerConnection({ iceServers: [], encodedInsertableStreams: insertable });
  state.pc = pc;
  state.channel = pc.createDataChannel("coefficients");
  state.channel.onmessage = onMessage;
  state.channel.onopen = () => { setStatus("tracking"); sendOptions(); enableSessionButtons(true); };
  pc.ontrack = (ev) => {
    if (insertable) passThrough(ev.receiver);
    $("remote").srcObject = new MediaStream([ev.track]);
    countVideoFrames();
  };
  pc.onconnectionstatechange = () => {
    if (pc.connectionState === "failed") setStatus("connection failed", true);
  };
  const track = state.stream.getVideoTracks()[0];
  const transceiver = pc.addTransceiver(track, { direction: "sendrecv", streams: [state.stream] });
  if (insertable) watchSender(transceiver.sender);
  await pc.setLocalDescription(await pc.createOffer());
  await waitForIce(pc);
  const resp = await fetch("/offer", {
    method: "POST", headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ sdp: pc.localDescription.sdp, type: pc.localDescription.type,
                           options: currentOptions() }),
  });
  const answer = await resp.json();
  if (!resp.ok) {
    setStatus("server refused: " + answer.error, true);
    stop();
    return;
  }
  state.session = answer.session;
  await pc.setRemoteDescription(answer);
  $("stop").disabled = false;
  $("record").disabled = false;
  setStatus("connecting...");
}

function waitForIce(pc) {
  if (pc.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve) => {
    const check = () => { if (pc.iceGatheringState === "complete") { pc.removeEventListener("icegatheringstatechange", check); resolve(); } };
    pc.addEventListener("icegatheringstatechange", check);
    setTimeout(resolve, 3000);  // send what we have
  });
}

function countVideoFrames() {
  const v = $("remote");
  if (!v.requestVideoFrameCallback) return;
  const tick = () => { window.facestream.videoFrames += 1; v.requestVideoFrameCallback(tick); };
  v.requestVideoFrameCallback(tick);
}

function stop() {
  if (state.pc) state.pc.close();
  if (state.stream) state.stream.getTracks().forEach((t) => t.stop());
  state.pc = state.channel = state.stream = null;
  state.session = null;
  $("start").disabled = false;
  $("stop").disabled = true;
  enableSessionButtons(false);
  setStatus("stopped");
}

function enableSessionButtons(on) {
  for (const id of ["cal-neutral", "cal-ranges", "cal-identity", "save-profile", "load-profile"]) $(id).disabled = !on;
}

function currentOptions() {
  return { style: $("style").value, avatar: $("avatar").checked };
}

function send(obj) {
  if (state.channel && state.channel.readyState === "open") state.channel.send(JSON.stringify(obj));
}

function sendOptions() { send({ type: "options", ...currentOptions() }); }

// ---------------------------------------------------------------- recording and calibration
function toggleRecord() {
  state.recording = !state.recording;
  $("record").textContent = state.recording ? "Stop recording" : "Record";
  $("record").classList.toggle("on", state.recording);
  if (state.recording) state.recorded = [];
  $("download").disabled = state.recording || state.recorded.length === 0;
}

function download(name, text, type) {
  const a = document.createElement("a");
  a.href = URL.createObjectURL(new Blob([text], { type }));
  a.download = name;
  a.click();
  setTimeout(() => URL.revokeObjectURL(a.href), 1000);
}

function calibrate(what, seconds, hint) {
  setStatus(`calibrating ${what}: ${hint}`);
  send({ type: "calibrate", what, seconds });
}

async function saveProfile() {
  const resp = await fetch(`/sessions/${state.session}/profile`);
  const body = await resp.text();
  if (!resp.ok) { setStatus(JSON.parse(body).error, true); return; }
  download("facestream-profile.json", body, "application/json");
}

async function loadProfile(ev) {
  const file = ev.target.files[0];
  if (!file) return;
  const resp = await fetch(`/sessions/${state.session}/profile`, {
    method: "PUT", headers: { "Content-Type": "application/json" }, body: await file.text() });
  const body = await resp.json();
  setStatus(resp.ok ? `profile ${body.loaded} loaded` : body.error, !resp.ok);
  ev.target.value = "";
}

$("start").onclick = start;
$("stop").onclick = stop;
$("style").onchange = sendOptions;
$("avatar").onchange = sendOptions;
$("record").onclick = toggleRecord;
$("download").onclick = () => download(`facestream-${state.session || "session"}.jsonl`,
  state.recorded.join("\n") + "\n", "application/x-ndjson");
$("cal-neutral").onclick = () => calibrate("neutral", 2, "relax your face and look at the camera");
$("cal-ranges").onclick = () => calibrate("ranges", 6, "blink, smile wide, open your jaw, raise and lower your brows");
$("cal-identity").onclick = () => calibrate("identity", 10, "look at the camera");
$("save-profile").onclick = saveProfile;
$("load-profile").onchange = loadProfile;
setInterval(() => { if (!state.drawPending) { state.drawPending = true; requestAnimationFrame(draw); } }, 500);
