// The stem player: one <audio> per stem, one shared transport, mute/solo/volume per stem,
// and a waveform per stem drawn from the decoded audio.

import { formatClock } from "./progress.js";

const PEAK_BUCKETS = 2000;           // waveform resolution, independent of the canvas size
const DRIFT_TOLERANCE_S = 0.04;      // re-align a stem that drifts further than this from the first
const DECODE_SAMPLERATE = 22050;     // waveforms only need the envelope; halves decoding memory
const MIN_WAVEFORM_PEAK = 1 / 64;    // quieter than -36 dBFS at its loudest: drawn no larger

/** Peak and RMS of |sample| over all channels, in `buckets` equal slices of the buffer. */
export function computePeaks(audioBuffer, buckets = PEAK_BUCKETS) {
  const channels = Array.from({ length: audioBuffer.numberOfChannels }, (_, c) => audioBuffer.getChannelData(c));
  const length = audioBuffer.length;
  const count = Math.max(1, Math.min(buckets, length));
  const peak = new Float32Array(count);
  const rms = new Float32Array(count);
  for (let b = 0; b < count; b++) {
    const start = Math.floor(b * length / count);
    const end = Math.max(start + 1, Math.floor((b + 1) * length / count));
    let max = 0, sum = 0;
    for (const data of channels) {
      for (let i = start; i < end; i++) {
        const v = Math.abs(data[i]);
        if (v > max) max = v;
        sum += v * v;
      }
    }
    peak[b] = max;
    rms[b] = Math.sqrt(sum / ((end - start) * channels.length));
  }
  return { peak, rms };
}

async function decodePeaks(arrayBuffer) {
  const context = new OfflineAudioContext(1, 1, DECODE_SAMPLERATE);
  return computePeaks(await context.decodeAudioData(arrayBuffer));
}

class Track {
  constructor(mixer, element, name) {
    this.mixer = mixer;
    this.element = element;
    this.name = name;
    this.audio = element.querySelector("audio");
    this.canvas = element.querySelector("canvas");
    this.muteButton = element.querySelector('[data-action="mute"]');
    this.soloButton = element.querySelector('[data-action="solo"]');
    this.volume = element.querySelector('[data-role="volume"]');
    this.download = element.querySelector('[data-role="download"]');
    this.muted = false;
    this.soloed = false;
    this.peaks = null;
    this.objectUrl = null;

    element.querySelector('[data-role="stem-name"]').textContent = name;
    this.audio.dataset.stem = name;
    this.muteButton.setAttribute("aria-label", `Mute ${name}`);
    this.soloButton.setAttribute("aria-label", `Solo ${name}`);
    this.volume.setAttribute("aria-label", `${name} volume`);
    this.download.setAttribute("aria-label", `Download ${name}`);
    this.canvas.setAttribute("role", "img");
    this.canvas.setAttribute("aria-label", `${name} waveform; click to move the playhead`);

    this.muteButton.addEventListener("click", () => { this.muted = !this.muted; mixer.applyMix(); });
    this.soloButton.addEventListener("click", () => { this.soloed = !this.soloed; mixer.applyMix(); });
    this.volume.addEventListener("input", () => { this.audio.volume = Number(this.volume.value); });
    this.canvas.addEventListener("click", (event) => {
      const box = this.canvas.getBoundingClientRect();
      mixer.seek(((event.clientX - box.left) / box.width) * mixer.duration);
    });
    this.audio.addEventListener("loadedmetadata", () => mixer.trackReady());
  }

  /**
   * Point the stem's <audio> and download link at its audio. With `fetchBytes(url)` (which
   * resolves to a Blob, fetched with the API key) the audio plays from memory and the
   * waveform can be drawn from it; without, the <audio> streams the URL itself (range
   * requests) and no waveform is drawn.
   */
  async attach(url, filename, fetchBytes = null) {
    this.download.download = filename;
    if (!fetchBytes) {
      this.audio.src = url;
      this.download.href = url;
      return;
    }
    this.blob = await fetchBytes(url);
    this.objectUrl = URL.createObjectURL(this.blob);
    this.audio.src = this.objectUrl;
    this.download.href = this.objectUrl;
  }

  /** Decode the attached audio and draw its waveform (one stem at a time: decoding is big). */
  async drawWaveform() {
    try {
      if (!this.blob) throw new Error("not in memory");
      this.peaks = await decodePeaks(await this.blob.arrayBuffer());
      this.peakMax = Math.max(0, ...this.peaks.peak);
      this.element.dataset.waveform = "drawn";
    } catch {
      this.element.classList.add("no-waveform");  // playable, but no picture of it
      this.element.dataset.waveform = "none";
    }
    this.mixer.drawAll();  // the shared waveform gain may have changed
  }

  get audible() {
    return this.mixer.anySolo ? this.soloed : !this.muted;
  }

  draw() {
    const canvas = this.canvas;
    const ratio = window.devicePixelRatio || 1;
    const width = Math.max(1, Math.round(canvas.clientWidth * ratio));
    const height = Math.max(1, Math.round(canvas.clientHeight * ratio));
    if (canvas.width !== width || canvas.height !== height) { canvas.width = width; canvas.height = height; }
    const context = canvas.getContext("2d");
    context.clearRect(0, 0, width, height);
    const style = getComputedStyle(this.element);
    const played = style.getPropertyValue("--wave-played").trim() || "#7c5cff";
    const rest = style.getPropertyValue("--wave-rest").trim() || "#8a8fa3";
    const head = this.mixer.duration ? this.mixer.position / this.mixer.duration : 0;
    const middle = height / 2;
    const scale = middle * this.mixer.waveformGain;
    if (this.peaks) {
      const { peak, rms } = this.peaks;
      for (let x = 0; x < width; x++) {
        const b = Math.min(peak.length - 1, Math.floor((x / width) * peak.length));
        context.fillStyle = x / width <= head ? played : rest;
        const p = Math.min(middle, peak[b] * scale);
        context.globalAlpha = 0.45;
        context.fillRect(x, middle - p, 1, Math.max(1, 2 * p));
        const r = Math.min(middle, rms[b] * scale);
        context.globalAlpha = 1;
        context.fillRect(x, middle - r, 1, Math.max(1, 2 * r));
      }
    } else {
      context.fillStyle = rest;
      context.fillRect(0, middle, width, 1);
    }
    context.globalAlpha = 1;
    context.fillStyle = played;
    context.fillRect(Math.round(head * width), 0, Math.max(1, ratio), height);
  }

  dispose() {
    this.audio.pause();
    this.audio.removeAttribute("src");
    this.audio.load();
    if (this.objectUrl) URL.revokeObjectURL(this.objectUrl);
  }
}

/**
 * All stems of one job behind one transport: play/pause, seek and time move every stem together.
 * `onPlay(mixer)` is called when it starts playing (the page pauses the other jobs' mixers).
 */
export class Mixer {
  constructor(root, { onPlay = () => {} } = {}) {
    this.root = root;
    this.list = root.querySelector('[data-role="stems"]');
    this.playButton = root.querySelector('[data-action="play"]');
    this.seekInput = root.querySelector('[data-role="seek"]');
    this.timeLabel = root.querySelector('[data-role="time"]');
    this.onPlay = onPlay;
    this.tracks = [];
    this.playing = false;
    this.position = 0;
    this.duration = 0;
    this.frame = null;
    this.redraw = () => this.drawAll();

    this.playButton.addEventListener("click", () => this.toggle());
    this.seekInput.addEventListener("input", () => this.seek(Number(this.seekInput.value)));
    window.addEventListener("resize", this.redraw);
  }

  /** Whether there is something to play. */
  get ready() { return this.tracks.length > 0 && this.duration > 0; }

  toggle() {
    return this.playing ? this.pause() : this.play();
  }

  /**
   * One vertical gain for every waveform of the job: the loudest stem's peak fills its
   * height, so quiet mixes stay visible and stems keep their loudness relative to each other.
   */
  get waveformGain() {
    const loudest = Math.max(0, ...this.tracks.filter((t) => t.peaks).map((t) => t.peakMax));
    return 1 / Math.max(loudest, MIN_WAVEFORM_PEAK);
  }

  get anySolo() { return this.tracks.some((track) => track.soloed); }

  /** Add a stem; `element` is a clone of the page's stem template. */
  addTrack(element, name) {
    const track = new Track(this, element, name);
    this.tracks.push(track);
    this.list.append(element);
    track.audio.addEventListener("ended", () => { if (track === this.tracks[0]) this.stop(); });
    this.updateTransport();
    return track;
  }

  clear() {
    this.pause();
    for (const track of this.tracks) track.dispose();
    this.tracks = [];
    this.list.replaceChildren();
    this.position = 0;
    this.duration = 0;
    this.updateTransport();
  }

  /** Stop and let go of everything: the mixer's element is leaving the page. */
  dispose() {
    this.clear();
    window.removeEventListener("resize", this.redraw);
  }

  trackReady() {
    const durations = this.tracks.map((track) => track.audio.duration).filter((d) => isFinite(d));
    this.duration = durations.length ? Math.max(...durations) : 0;
    this.updateTransport();
  }

  applyMix() {
    for (const track of this.tracks) {
      track.audio.muted = !track.audible;
      track.element.classList.toggle("silent", !track.audible);
      track.muteButton.setAttribute("aria-pressed", String(track.muted));
      track.soloButton.setAttribute("aria-pressed", String(track.soloed));
    }
    this.drawAll();
  }

  async play() {
    if (!this.tracks.length) return;
    if (this.position >= this.duration) this.position = 0;
    for (const track of this.tracks) track.audio.currentTime = this.position;
    this.playing = true;
    this.onPlay(this);
    this.updateTransport();
    try {
      await Promise.all(this.tracks.map((track) => track.audio.play()));
    } catch (error) {
      if (error.name !== "AbortError") { this.pause(); throw error; }  // AbortError: paused meanwhile
    }
    this.tick();
  }

  pause() {
    for (const track of this.tracks) track.audio.pause();
    if (this.tracks.length) this.position = this.tracks[0].audio.currentTime;
    this.playing = false;
    cancelAnimationFrame(this.frame);
    this.updateTransport();
  }

  stop() {
    this.pause();
    this.seek(0);
  }

  seek(seconds) {
    this.position = Math.min(Math.max(0, seconds || 0), this.duration || 0);
    for (const track of this.tracks) track.audio.currentTime = this.position;
    this.updateTransport();
  }

  tick() {
    cancelAnimationFrame(this.frame);
    if (!this.playing) return;
    const [leader, ...others] = this.tracks;
    this.position = leader.audio.currentTime;
    // Elements started together stay together; re-align one that stalled or drifted.
    for (const track of others) {
      if (Math.abs(track.audio.currentTime - this.position) > DRIFT_TOLERANCE_S) {
        track.audio.currentTime = this.position;
      }
    }
    this.updateTransport();
    this.frame = requestAnimationFrame(() => this.tick());
  }

  updateTransport() {
    this.playButton.disabled = !this.ready;
    this.seekInput.disabled = !this.ready;
    this.playButton.classList.toggle("playing", this.playing);
    this.playButton.setAttribute("aria-label", this.playing ? "Pause" : "Play");
    this.seekInput.max = String(this.duration || 0);
    this.seekInput.value = String(this.position);
    this.seekInput.setAttribute("aria-valuetext", `${formatClock(this.position)} of ${formatClock(this.duration)}`);
    this.timeLabel.textContent = `${formatClock(this.position)} / ${formatClock(this.duration)}`;
    this.drawAll();
  }

  drawAll() {
    for (const track of this.tracks) track.draw();
  }
}
