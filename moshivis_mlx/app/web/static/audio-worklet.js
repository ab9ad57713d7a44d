// Audio thread of the page: the microphone cut into the model's 80 ms frames, and
// the model's answer played through a small jitter buffer. Both resample when the
// AudioContext does not run at the model's 24 kHz (Firefox cannot connect a
// microphone to a context at another rate than the device's: Mozilla bug 1674892).

const KERNEL_HALF_WIDTH = 16; // input samples on each side of an output sample
const KERNEL_STEPS = 256; // kernel table resolution per input sample

// Streaming windowed-sinc resampler (Hann window), low-passed below the lower Nyquist.
class Resampler {
  constructor(fromRate, toRate) {
    this.identity = fromRate === toRate;
    this.step = fromRate / toRate; // input samples per output sample
    const cutoff = 0.95 * Math.min(1, toRate / fromRate); // of the input's Nyquist
    const half = KERNEL_HALF_WIDTH / Math.min(1, toRate / fromRate);
    this.half = Math.ceil(half);
    this.table = new Float32Array(this.half * KERNEL_STEPS + 2);
    for (let i = 0; i < this.table.length; i++) {
      const x = i / KERNEL_STEPS;
      const sinc = x === 0 ? 1 : Math.sin(Math.PI * cutoff * x) / (Math.PI * cutoff * x);
      const window = x < this.half ? 0.5 * (1 + Math.cos((Math.PI * x) / this.half)) : 0;
      this.table[i] = cutoff * sinc * window;
    }
    this.history = new Float32Array(this.half); // zeros before the first sample
    this.position = this.half; // of the next output sample, in `history` coordinates
  }

  kernel(distance) {
    const at = Math.abs(distance) * KERNEL_STEPS;
    const i = Math.floor(at);
    if (i + 1 >= this.table.length) return 0;
    return this.table[i] + (at - i) * (this.table[i + 1] - this.table[i]);
  }

  process(input) {
    if (this.identity) return Float32Array.from(input);
    const buf = new Float32Array(this.history.length + input.length);
    buf.set(this.history);
    buf.set(input, this.history.length);
    const out = [];
    while (Math.floor(this.position) + this.half < buf.length) {
      const centre = Math.floor(this.position);
      let sum = 0;
      for (let k = centre - this.half + 1; k <= centre + this.half; k++) {
        sum += buf[k] * this.kernel(this.position - k);
      }
      out.push(sum);
      this.position += this.step;
    }
    const keep = Math.max(0, Math.floor(this.position) - this.half + 1);
    this.history = buf.slice(keep);
    this.position -= keep;
    return Float32Array.from(out);
  }
}

// Microphone -> frames of `frameSize` samples at `modelRate`, posted to the page.
class CaptureProcessor extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const { modelRate, frameSize } = options.processorOptions;
    this.resampler = new Resampler(sampleRate, modelRate);
    this.frameSize = frameSize;
    this.frame = new Float32Array(frameSize);
    this.filled = 0;
  }

  process(inputs) {
    const channel = inputs[0] && inputs[0][0];
    if (!channel) return true;
    const samples = this.resampler.process(channel);
    let offset = 0;
    while (offset < samples.length) {
      const n = Math.min(samples.length - offset, this.frameSize - this.filled);
      this.frame.set(samples.subarray(offset, offset + n), this.filled);
      this.filled += n;
      offset += n;
      if (this.filled === this.frameSize) {
        this.port.postMessage(this.frame, [this.frame.buffer]); // transferred: `frame` is emptied
        this.frame = new Float32Array(this.frameSize);
        this.filled = 0;
      }
    }
    return true;
  }
}

// The model's audio at `modelRate` -> the speaker, through a jitter buffer: playback
// starts once `startSeconds` are queued, restarts that way after running dry (an
// underrun), and the oldest audio beyond `maxSeconds` is dropped.
class PlayerProcessor extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const { modelRate, startSeconds, maxSeconds } = options.processorOptions;
    this.resampler = new Resampler(modelRate, sampleRate);
    this.buffer = new Float32Array(Math.ceil(maxSeconds * sampleRate));
    this.read = 0;
    this.size = 0;
    this.startSamples = Math.ceil(startSeconds * sampleRate);
    this.playing = false;
    this.stats = { received: 0, playedSeconds: 0, underruns: 0, droppedSeconds: 0, bufferedSeconds: 0 };
    this.quanta = 0;
    this.port.onmessage = (event) => {
      if (event.data === "clear") {
        this.size = 0;
        this.playing = false;
        return;
      }
      this.stats.received += 1;
      this.push(this.resampler.process(event.data));
    };
  }

  push(samples) {
    const cap = this.buffer.length;
    const overflow = Math.max(0, this.size + samples.length - cap);
    if (overflow > 0) {
      const dropped = Math.min(overflow, this.size);
      this.read = (this.read + dropped) % cap;
      this.size -= dropped;
      this.stats.droppedSeconds += overflow / sampleRate;
      samples = samples.subarray(Math.max(0, samples.length - cap));
    }
    for (let i = 0; i < samples.length; i++) {
      this.buffer[(this.read + this.size + i) % cap] = samples[i];
    }
    this.size += samples.length;
  }

  process(inputs, outputs) {
    const out = outputs[0][0];
    if (!this.playing && this.size >= this.startSamples) this.playing = true;
    let n = 0;
    if (this.playing) {
      n = Math.min(out.length, this.size);
      for (let i = 0; i < n; i++) out[i] = this.buffer[(this.read + i) % this.buffer.length];
      this.read = (this.read + n) % this.buffer.length;
      this.size -= n;
      this.stats.playedSeconds += n / sampleRate;
      if (n < out.length) {
        this.stats.underruns += 1;
        this.playing = false;
      }
    }
    out.fill(0, n);
    for (let c = 1; c < outputs[0].length; c++) outputs[0][c].set(out);
    if (++this.quanta % 32 === 0) {
      this.stats.bufferedSeconds = this.size / sampleRate;
      this.port.postMessage({ ...this.stats });
    }
    return true;
  }
}

registerProcessor("moshivis-capture", CaptureProcessor);
registerProcessor("moshivis-player", PlayerProcessor);
