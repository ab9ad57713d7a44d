// The page: microphone -> websocket -> speaker, the picture, the transcript.
// The messages are those of moshivis_mlx/web/protocol.py (a kind byte first).

const KIND = { AUDIO: 1, TEXT: 2, IMAGE: 3, STATUS: 4, CONTROL: 5, ERROR: 6 };
const MODEL_RATE = 24000;
const FRAME_SIZE = 1920; // 80 ms
const PLAYER_START_SECONDS = 0.16; // jitter buffer: two frames before playing
const PLAYER_MAX_SECONDS = 1.0; // older audio is dropped beyond this
const DEFAULT_MAX_IMAGE_BYTES = 20 * 1024 * 1024;
// How strongly a word is shaded, from its gate (the scale of Kyutai's server).
const GATE_FLOOR = 0.005;
const GATE_RANGE = 0.016;
const CAMERA_JPEG_QUALITY = 0.92;

const $ = (id) => document.getElementById(id);
const ui = {
  start: $("start"), reset: $("reset"), image: $("image"), camera: $("camera"), status: $("status"),
  transcript: $("transcript"), message: $("message"), picture: $("picture"), preview: $("camera-preview"),
  hint: $("picture-hint"), area: $("picture-area"), recording: $("download-recording"),
  transcriptFile: $("download-transcript"), echo: $("echo-cancellation"), noise: $("noise-suppression"),
  gain: $("auto-gain"),
};

// What the tests (and a curious user in the console) can read.
const debug = {
  ready: false, sentFrames: 0, receivedFrames: 0, pieces: 0, player: {}, pictures: 0, errors: [], resets: 0, piecesAtReset: 0,
};
window.moshivis = debug;

let talk = null; // the running conversation: socket, audio graph, microphone
let picture = null; // the picture the model sees (or will see once started): a Blob
const pendingPictures = []; // sent, not yet answered by the server (answers come in order)
let camera = null; // the camera's stream while its preview is shown
let maxImageBytes = DEFAULT_MAX_IMAGE_BYTES;
const recording = { you: [], model: [] }; // Int16Array chunks at 24 kHz
let transcriptText = "";

function say(text) { ui.message.textContent = text; }

// -- the conversation ----------------------------------------------------------------

async function start() {
  ui.start.disabled = true;
  say("");
  try {
    talk = { closing: false };
    talk.mic = await navigator.mediaDevices.getUserMedia({ audio: micConstraints() });
    await openAudio(talk);
    const scheme = location.protocol === "https:" ? "wss" : "ws";
    talk.ws = new WebSocket(`${scheme}://${location.host}/ws`);
    talk.ws.binaryType = "arraybuffer";
    talk.ws.onmessage = (event) => receive(new Uint8Array(event.data));
    talk.ws.onclose = () => stop(talk && !talk.closing ? "The connection to the server closed." : null);
    recording.you = [];
    recording.model = [];
    ui.start.textContent = "Stop";
    ui.start.classList.add("running");
    ui.reset.disabled = false;
  } catch (error) {
    await stop(`Cannot start: ${error.message || error}`);
  } finally {
    ui.start.disabled = false;
  }
}

async function stop(reason) {
  const ending = talk;
  talk = null;
  debug.ready = false;
  pendingPictures.length = 0;
  if (ending) {
    ending.closing = true;
    if (ending.ws && ending.ws.readyState <= WebSocket.OPEN) ending.ws.close();
    if (ending.mic) ending.mic.getTracks().forEach((track) => track.stop());
    if (ending.context) await ending.context.close().catch(() => {});
  }
  ui.start.textContent = "Start";
  ui.start.classList.remove("running");
  ui.reset.disabled = true;
  if (reason) say(reason);
  updateDownloads();
}

function micConstraints() {
  return {
    channelCount: 1,
    echoCancellation: ui.echo.checked,
    noiseSuppression: ui.noise.checked,
    autoGainControl: ui.gain.checked,
  };
}

// A context at 24 kHz where the browser can connect the microphone to it; else (Firefox)
// at the device's rate, and the worklet resamples. `?resample` forces the second way.
async function openAudio(t) {
  const forceDeviceRate = new URLSearchParams(location.search).has("resample");
  if (!forceDeviceRate) {
    t.context = new AudioContext({ sampleRate: MODEL_RATE, latencyHint: "interactive" });
    try {
      t.source = t.context.createMediaStreamSource(t.mic);
    } catch (error) {
      await t.context.close();
      t.context = null;
    }
  }
  if (!t.context) {
    t.context = new AudioContext({ latencyHint: "interactive" });
    t.source = t.context.createMediaStreamSource(t.mic);
  }
  const ctx = t.context;
  await ctx.audioWorklet.addModule("/static/audio-worklet.js");
  t.capture = new AudioWorkletNode(ctx, "moshivis-capture", {
    processorOptions: { modelRate: MODEL_RATE, frameSize: FRAME_SIZE },
  });
  t.player = new AudioWorkletNode(ctx, "moshivis-player", {
    outputChannelCount: [1],
    processorOptions: { modelRate: MODEL_RATE, startSeconds: PLAYER_START_SECONDS, maxSeconds: PLAYER_MAX_SECONDS },
  });
  t.capture.port.onmessage = (event) => sendFrame(t, event.data);
  t.player.port.onmessage = (event) => { debug.player = event.data; };
  t.source.connect(t.capture);
  t.capture.connect(ctx.destination); // silent; keeps the capture running
  t.player.connect(ctx.destination);
  debug.contextRate = ctx.sampleRate;
  if (ctx.state !== "running") await ctx.resume();
}

function sendFrame(t, samples) {
  if (t !== talk || !debug.ready || t.ws.readyState !== WebSocket.OPEN) return; // before "ready": not heard
  const pcm = new Int16Array(samples.length);
  for (let i = 0; i < samples.length; i++) pcm[i] = Math.max(-32768, Math.min(32767, Math.round(samples[i] * 32768)));
  t.ws.send(message(KIND.AUDIO, new Uint8Array(pcm.buffer)));
  recording.you.push(pcm);
  debug.sentFrames += 1;
}

function message(kind, payload) {
  const out = new Uint8Array(1 + payload.length);
  out[0] = kind;
  out.set(payload, 1);
  return out;
}

function sendJSON(kind, object) {
  if (talk && talk.ws.readyState === WebSocket.OPEN) {
    talk.ws.send(message(kind, new TextEncoder().encode(JSON.stringify(object))));
  }
}

function receive(data) {
  const kind = data[0];
  const payload = data.subarray(1);
  if (kind === KIND.AUDIO) {
    const pcm = new Int16Array(payload.slice().buffer);
    const samples = Float32Array.from(pcm, (v) => v / 32768);
    if (talk) talk.player.port.postMessage(samples, [samples.buffer]);
    recording.model.push(pcm);
    debug.receivedFrames += 1;
  } else if (kind === KIND.TEXT) {
    const gate = new DataView(payload.buffer, payload.byteOffset, 4).getFloat32(0, true);
    addText(new TextDecoder().decode(payload.subarray(4)), gate);
  } else if (kind === KIND.STATUS) {
    onStatus(JSON.parse(new TextDecoder().decode(payload)));
  } else if (kind === KIND.ERROR) {
    onError(JSON.parse(new TextDecoder().decode(payload)));
  }
}

function onStatus(status) {
  if (status.event === "ready") {
    if (status.sample_rate !== MODEL_RATE || status.frame_size !== FRAME_SIZE) {
      stop(`The server speaks ${status.sample_rate} Hz in frames of ${status.frame_size}; this page expects ${MODEL_RATE} Hz and ${FRAME_SIZE}.`);
      return;
    }
    maxImageBytes = status.max_image_bytes;
    debug.ready = true;
    if (picture) sendPicture(picture);
    ui.status.textContent = "Listening: talk about the picture.";
  } else if (status.event === "stats") {
    const p = debug.player;
    ui.status.textContent = `rtf ${status.rtf.toFixed(2)} | lag ${status.lag.toFixed(2)} s | dropped ${status.dropped}`
      + ` | underruns ${p.underruns || 0} | buffer ${(p.bufferedSeconds || 0).toFixed(2)} s`;
    debug.stats = status;
  } else if (status.event === "image") {
    showPicture(pendingPictures.shift());
    debug.pictures += 1;
    say("The model now sees this picture.");
  } else if (status.event === "reset") {
    ui.transcript.textContent = "";
    transcriptText = "";
    debug.resets += 1;
    debug.piecesAtReset = debug.pieces;
    say("A new conversation.");
  }
}

function onError(error) {
  debug.errors.push(error);
  if (error.code === "busy") {
    stop("The model is busy: another page is talking with it. Try again when it is done.");
  } else if (error.code === "image") {
    pendingPictures.shift();
    say(`Picture refused: ${error.message}`);
  } else {
    say(`Server: ${error.message}`);
  }
}

function addText(piece, gate) {
  const span = document.createElement("span");
  span.textContent = piece;
  const level = Math.max(0, Math.min(1, (gate - GATE_FLOOR) / GATE_RANGE));
  span.style.backgroundColor = `rgba(var(--gate), ${(0.65 * level).toFixed(3)})`;
  span.dataset.gate = gate.toFixed(4);
  span.title = `gate ${gate.toFixed(4)}`;
  ui.transcript.append(span);
  ui.transcript.scrollTop = ui.transcript.scrollHeight;
  transcriptText += piece;
  debug.pieces += 1;
  updateDownloads();
}

// -- the picture -----------------------------------------------------------------------

function usePicture(blob) {
  if (!blob) return;
  if (blob.size > maxImageBytes) {
    say(`This picture is ${(blob.size / 2 ** 20).toFixed(1)} MB; the limit is ${(maxImageBytes / 2 ** 20).toFixed(0)} MB.`);
    return;
  }
  if (talk && debug.ready) {
    sendPicture(blob);
    say("Sending the picture…");
  } else {
    showPicture(blob); // sent when the conversation starts
  }
}

async function sendPicture(blob) {
  const bytes = new Uint8Array(await blob.arrayBuffer());
  if (!talk || talk.ws.readyState !== WebSocket.OPEN) return;
  pendingPictures.push(blob);
  talk.ws.send(message(KIND.IMAGE, bytes));
}

function showPicture(blob) {
  if (!blob) return;
  if (ui.picture.src) URL.revokeObjectURL(ui.picture.src);
  picture = blob;
  ui.picture.src = URL.createObjectURL(blob);
  ui.picture.hidden = false;
  ui.hint.hidden = true;
}

async function toggleCamera() {
  if (!camera) {
    try {
      camera = await navigator.mediaDevices.getUserMedia({ video: true });
    } catch (error) {
      say(`No camera: ${error.message || error}`);
      return;
    }
    ui.preview.srcObject = camera;
    ui.preview.hidden = false;
    ui.picture.hidden = true;
    ui.hint.hidden = true;
    await ui.preview.play();
    ui.camera.textContent = "Take the picture";
    return;
  }
  const canvas = document.createElement("canvas");
  canvas.width = ui.preview.videoWidth;
  canvas.height = ui.preview.videoHeight;
  canvas.getContext("2d").drawImage(ui.preview, 0, 0);
  camera.getTracks().forEach((track) => track.stop());
  camera = null;
  ui.preview.srcObject = null;
  ui.preview.hidden = true;
  ui.picture.hidden = !picture;
  ui.hint.hidden = !!picture;
  ui.camera.textContent = "Camera";
  const blob = await new Promise((resolve) => canvas.toBlob(resolve, "image/jpeg", CAMERA_JPEG_QUALITY));
  usePicture(blob);
}

// -- downloads ---------------------------------------------------------------------------

function updateDownloads() {
  ui.recording.disabled = recording.you.length === 0;
  ui.transcriptFile.disabled = transcriptText.length === 0;
}

function download(blob, name) {
  const a = document.createElement("a");
  a.href = URL.createObjectURL(blob);
  a.download = name;
  a.click();
  setTimeout(() => URL.revokeObjectURL(a.href), 1000);
}

// You on the left, the model on the right, 16-bit PCM at 24 kHz.
function stereoWav(left, right) {
  const join = (chunks) => {
    const out = new Int16Array(chunks.reduce((n, c) => n + c.length, 0));
    let at = 0;
    for (const c of chunks) { out.set(c, at); at += c.length; }
    return out;
  };
  const l = join(left);
  const r = join(right);
  const frames = Math.max(l.length, r.length);
  const view = new DataView(new ArrayBuffer(44 + frames * 4));
  const ascii = (at, text) => { for (let i = 0; i < text.length; i++) view.setUint8(at + i, text.charCodeAt(i)); };
  ascii(0, "RIFF"); view.setUint32(4, 36 + frames * 4, true); ascii(8, "WAVE");
  ascii(12, "fmt "); view.setUint32(16, 16, true); view.setUint16(20, 1, true); view.setUint16(22, 2, true);
  view.setUint32(24, MODEL_RATE, true); view.setUint32(28, MODEL_RATE * 4, true);
  view.setUint16(32, 4, true); view.setUint16(34, 16, true);
  ascii(36, "data"); view.setUint32(40, frames * 4, true);
  for (let i = 0; i < frames; i++) {
    view.setInt16(44 + 4 * i, l[i] || 0, true);
    view.setInt16(46 + 4 * i, r[i] || 0, true);
  }
  return new Blob([view.buffer], { type: "audio/wav" });
}

// -- wiring --------------------------------------------------------------------------------

ui.start.addEventListener("click", () => (talk ? stop() : start()));
ui.reset.addEventListener("click", () => sendJSON(KIND.CONTROL, { action: "reset" }));
ui.image.addEventListener("change", () => {
  usePicture(ui.image.files[0]);
  ui.image.value = ""; // the same file may be chosen again
});
ui.camera.addEventListener("click", () => toggleCamera());
ui.recording.addEventListener("click", () => download(stereoWav(recording.you, recording.model), "moshivis-recording.wav"));
ui.transcriptFile.addEventListener("click", () => download(new Blob([transcriptText + "\n"], { type: "text/plain" }), "moshivis-transcript.txt"));
for (const box of [ui.echo, ui.noise, ui.gain]) {
  box.addEventListener("change", () => {
    const track = talk && talk.mic && talk.mic.getAudioTracks()[0];
    if (track) track.applyConstraints(micConstraints()).catch((error) => say(`Microphone: ${error.message}`));
  });
}
document.addEventListener("dragover", (event) => {
  event.preventDefault();
  ui.area.classList.add("dragging");
});
document.addEventListener("dragleave", () => ui.area.classList.remove("dragging"));
document.addEventListener("drop", (event) => {
  event.preventDefault();
  ui.area.classList.remove("dragging");
  const file = [...event.dataTransfer.files].find((f) => f.type.startsWith("image/")) || event.dataTransfer.files[0];
  usePicture(file);
});
