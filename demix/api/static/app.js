// The page: the upload form (several files at once, one job each, for a model or a preset),
// a card per job with its own progress (a workflow's per step) and stem mixer, recent jobs,
// errors, the API key prompt.

import {
  ApiError, allowedMethods, apiFetch, apiJson, newIdempotencyKey, onKeyNeeded, storeKey, storedKey, upload,
} from "./client.js";
import { Mixer } from "./mixer.js";
import { EtaEstimator, describeJob } from "./progress.js";
import { findRecent, forgetJob, loadRecent, rememberJob, updateRecent } from "./recent.js";

const WAVEFORM_MAX_SECONDS = 1800;  // longer stems get no waveform and (without a key) stream from the server
const POLL_RUNNING_MS = 500;
const POLL_QUEUED_MS = 1000;
const POLL_RETRY_MS = 3000;
const FINISHED = new Set(["succeeded", "failed", "cancelled"]);

const $ = (selector, root = document) => root.querySelector(selector);
const limits = {
  uploadBytes: Number(document.body.dataset.maxUploadBytes) || Infinity,
  uploadMb: Number(document.body.dataset.maxUploadMb) || 0,
};
const ui = {
  form: $("#job-form"),
  file: $("input[type=file][name=file]"),
  fileName: $('[data-role="file-name"]'),
  dropzone: $('[data-role="dropzone"]'),
  format: $("#format"),
  sampleFormat: $("#sample_format"),
  samplerate: $("#samplerate"),
  channels: $("#channels"),
  preset: $("#preset"),
  presetHint: $('[data-role="preset-hint"]'),
  presetOutputNote: $('[data-role="preset-output-note"]'),
  bitrate: $("#bitrate"),
  error: $('[data-role="error"]'),
  keyForm: $('[data-role="api-key"]'),
  keyReason: $('[data-role="api-key-reason"]'),
  jobs: $('[data-role="jobs"]'),
  recent: $('[data-role="recent"]'),
  recentEmpty: $('[data-role="recent-empty"]'),
  jobTemplate: $("#job-template"),
  stemTemplate: $("#stem-template"),
  stepTemplate: $("#step-template"),
};

// ---- errors -------------------------------------------------------------------------

/** Show a message in the form's error box (a job's own problems show in its card). */
function showError(message) {
  ui.error.textContent = message;
  ui.error.hidden = false;
}

function clearError() {
  ui.error.textContent = "";
  ui.error.hidden = true;
}

function messageOf(error) {
  return error instanceof ApiError || error instanceof Error ? error.message : String(error);
}

// ---- API key ------------------------------------------------------------------------

onKeyNeeded((error) => new Promise((resolve) => {
  ui.keyReason.textContent = storedKey()
    ? `The API key was refused (the service says: ${error.message}). Enter another one.`
    : "This service needs an API key. Enter yours; this browser keeps it for next time.";
  ui.keyForm.hidden = false;
  const input = $("#api_key", ui.keyForm);
  input.value = "";
  input.focus();
  const save = (event) => {
    event.preventDefault();
    if (!input.value.trim()) return;
    storeKey(input.value.trim());
    ui.keyForm.hidden = true;
    resolve();
  };
  ui.keyForm.onsubmit = save;  // Enter in the field
  $('[data-action="save-key"]', ui.keyForm).onclick = save;
}));

$('[data-action="forget-key"]').addEventListener("click", () => {
  storeKey("");
  $("#api_key", ui.keyForm).value = "";
});

// ---- the form -----------------------------------------------------------------------

function formatBytes(bytes) {
  return bytes >= 1024 * 1024 ? `${(bytes / 1024 / 1024).toFixed(1)} MiB` : `${Math.ceil(bytes / 1024)} KiB`;
}

function chosenFiles() {
  return ui.file.files ? [...ui.file.files] : [];
}

/** Why `file` is not worth sending (the service would refuse it), or null. */
function sizeProblem(file) {
  if (file.size > limits.uploadBytes) {
    return `${file.name} is ${formatBytes(file.size)}; this service accepts files up to ${limits.uploadMb} MiB.`;
  }
  return null;
}

function onFilesChosen() {
  const files = chosenFiles();
  const total = files.reduce((sum, file) => sum + file.size, 0);
  ui.fileName.textContent = files.length === 0 ? "Drop audio files here"
    : files.length === 1 ? `${files[0].name} (${formatBytes(total)})`
    : `${files.length} files (${formatBytes(total)}): ${files.map((file) => file.name).join(", ")}`;
  ui.dropzone.classList.toggle("has-file", files.length > 0);
  // Said now, before anything is sent; submitting still sends the others.
  const problems = files.map(sizeProblem).filter(Boolean);
  if (problems.length) showError(problems.join(" ")); else clearError();
}

ui.file.addEventListener("change", onFilesChosen);
for (const type of ["dragenter", "dragover"]) {
  ui.dropzone.addEventListener(type, (event) => { event.preventDefault(); ui.dropzone.classList.add("dragging"); });
}
for (const type of ["dragleave", "drop"]) {
  ui.dropzone.addEventListener(type, () => ui.dropzone.classList.remove("dragging"));
}
ui.dropzone.addEventListener("drop", (event) => {
  event.preventDefault();
  if (event.dataTransfer && event.dataTransfer.files.length) {
    ui.file.files = event.dataTransfer.files;
    onFilesChosen();
  }
});

/** Keep the output options to combinations the API can write. */
function constrainOptions() {
  const format = ui.format.value;
  const mp3 = format === "mp3";
  ui.bitrate.disabled = !mp3;
  ui.sampleFormat.disabled = mp3;
  if (mp3) ui.sampleFormat.value = "";
  for (const option of ui.sampleFormat.options) {
    option.disabled = format === "flac" && option.value === "float32";
  }
  if (ui.sampleFormat.selectedOptions[0]?.disabled) ui.sampleFormat.value = "";
  const mp3Rates = new Set(ui.samplerate.dataset.mp3Rates.split(","));
  for (const option of ui.samplerate.options) {
    option.disabled = mp3 && option.value !== "input" && !mp3Rates.has(option.value);
  }
  if (ui.samplerate.selectedOptions[0]?.disabled) ui.samplerate.value = "input";
}
ui.format.addEventListener("change", constrainOptions);
constrainOptions();

/** The job options as the form has them now: every enabled <select> with a value. */
function formFields() {
  return [...ui.form.elements]
    .filter((element) => element.tagName === "SELECT" && !element.disabled && element.value !== "")
    .map((element) => [element.name, element.value]);
}

// Each model offers its own stems (`data-stems` of its option): the stems list follows the model.
const modelSelect = $("#model");
const stemsSelect = $("#stems");
function offerModelStems() {
  const chosen = modelSelect.selectedOptions[0];
  if (!chosen) return;
  const previous = stemsSelect.value;
  stemsSelect.replaceChildren(...chosen.dataset.stems.split(",").map((stem) => {
    const option = document.createElement("option");
    option.value = stem;
    option.textContent = stem === "all" ? "all stems" : `${stem} + no_${stem}`;
    return option;
  }));
  if ([...stemsSelect.options].some((option) => option.value === previous)) stemsSelect.value = previous;
}
modelSelect.addEventListener("change", offerModelStems);

// A preset names its own models and stems, and its stems keep the input's rate and
// channels: choosing one disables those controls (disabled ones are not sent).
const presetHintDefault = ui.presetHint.textContent.replace(/\s+/g, " ").trim();
function applyPreset() {
  const chosen = ui.preset.selectedOptions[0];
  const preset = chosen && chosen.value ? chosen : null;
  for (const select of [modelSelect, stemsSelect, ui.samplerate, ui.channels]) select.disabled = Boolean(preset);
  ui.presetOutputNote.hidden = !preset;
  const description = chosen?.dataset.description || "";
  ui.presetHint.textContent = !preset ? presetHintDefault : [
    description && !/[.!?]$/.test(description) ? `${description}.` : description,
    chosen.dataset.steps ? `Steps: ${chosen.dataset.steps}.` : "",
    chosen.dataset.outputs ? `Stems: ${chosen.dataset.outputs}.` : "",
  ].filter(Boolean).join(" ");
}
ui.preset.addEventListener("change", applyPreset);
applyPreset();  // a choice the browser kept over a reload

function jobForm(file, fields) {
  const data = new FormData();
  data.append("file", file, file.name);
  for (const [name, value] of fields) data.append(name, value);
  return data;
}

// One Idempotency-Key per file and options: sending the same again (after a 401, an upload
// whose answer was lost, or pressing Separate twice) gets the job the first try created
// where the service supports the header, instead of a second job. Deleting the job lets
// the same file and options make a new one.
const submissionKeys = new Map();  // fingerprint of file + options -> key

function submissionFingerprint(file, fields) {
  return JSON.stringify([file.name, file.size, file.lastModified, fields]);
}

// Uploads go one after another: they share the one connection, so the first file is
// queued (and the worker starts on it) while the next is still on its way, instead of all
// of them arriving late together; and a key prompt or per-key job limit meets one upload
// at a time.
let uploadQueue = Promise.resolve();

ui.form.addEventListener("submit", (event) => {
  event.preventDefault();
  clearError();
  const files = chosenFiles();
  if (!files.length) {
    showError("Choose one or more audio files first.");
    ui.file.focus();
    return;
  }
  const fields = formFields();
  const batch = { madeCurrent: false };
  const newCards = files.map((file) => new JobCard(file.name));
  ui.jobs.prepend(...newCards.map((card) => card.element));
  showWelcome();
  files.forEach((file, index) => {
    const card = newCards[index];
    const problem = sizeProblem(file);
    if (problem) {
      card.setState("not-sent");
      card.renderProgress(0, "Not sent");
      card.showError(problem);
      return;
    }
    card.setState("waiting");
    card.renderProgress(0, files.length > 1 ? `Waiting to upload (${index + 1} of ${files.length})` : "Waiting to upload");
    card.upload = { file, fields, fingerprint: submissionFingerprint(file, fields) };
    uploadQueue = uploadQueue.then(() => submitCard(card, batch));
  });
});

/** Upload a card's file and follow the job it creates; its problems show in the card. */
async function submitCard(card, batch) {
  if (card.closed) return;
  const { file, fields, fingerprint } = card.upload;
  card.clearError();
  card.setState("uploading");
  card.renderProgress(0, `Uploading ${file.name} — 0%`);
  if (!submissionKeys.has(fingerprint)) submissionKeys.set(fingerprint, newIdempotencyKey());
  let job;
  try {
    job = await upload("/v1/jobs", jobForm(file, fields), (fraction) => {
      const percent = Math.round(fraction * 100);
      card.renderProgress(percent, percent < 100 ? `Uploading ${file.name} — ${percent}%`
                                                : `Uploaded ${file.name}; the service is checking it…`);
    }, { "Idempotency-Key": submissionKeys.get(fingerprint) });
  } catch (error) {
    card.setState("not-sent");
    card.renderProgress(0, error.status ? "Refused by the service" : "Not sent");
    card.showError(messageOf(error));
    // Worth trying again (with the same key): the connection, a busy or failing service.
    card.retry.hidden = !(error.status === 0 || error.status === 429 || error.status >= 500);
    return;
  }
  const preset = new Map(fields).get("preset");
  rememberJob({ id: job.id, name: file.name, stems: preset ? `preset ${preset}` : job.stems,
                submittedAt: Date.now(), status: job.status });
  const existing = cardsByJob.get(job.id);
  if (existing && existing !== card) {  // the same file and options again: the job it already has
    card.remove();
    existing.focus();
    return;
  }
  if (card.closed) { renderRecent(); return; }
  card.fingerprint = fingerprint;
  card.preset = preset || null;
  card.setJob(job.id);
  if (!batch.madeCurrent) { batch.madeCurrent = true; makeCurrent(card); }
  renderRecent();
  card.follow(job);
}

// ---- the jobs' cards ----------------------------------------------------------------

const cardsByJob = new Map();  // job id -> its card on the page
const cardsOnPage = new Set();
let current = null;      // the card the address (#job=) and the space bar refer to
let capabilities = null;
let cardCount = 0;

/** One job's card: title, meta, progress, its errors, cancel/delete, and its own mixer. */
class JobCard {
  constructor(title) {
    this.element = ui.jobTemplate.content.firstElementChild.cloneNode(true);
    const part = (selector) => $(selector, this.element);
    this.title = part('[data-role="job-title"]');
    this.meta = part('[data-role="job-meta"]');
    this.bar = part('[data-role="progressbar"]');
    this.status = part('[data-role="status"]');
    this.error = part('[data-role="error"]');
    this.cancel = part('[data-action="cancel"]');
    this.delete = part('[data-action="delete"]');
    this.retry = part('[data-action="retry"]');
    this.close = part('[data-action="close"]');
    this.mixerElement = part('[data-role="mixer"]');
    this.zip = part('[data-role="zip"]');
    this.steps = part('[data-role="steps"]');
    this.stepRows = new Map();  // step name -> StepRow
    this.preset = null;
    this.mixer = new Mixer(this.mixerElement, { onPlay: (playing) => this.onPlay(playing) });
    this.id = null;
    this.closed = false;
    this.estimator = new EtaEstimator();
    this.stemsLoaded = false;
    this.lastJob = null;
    cardsOnPage.add(this);

    cardCount += 1;
    this.title.id = `job-${cardCount}-title`;
    this.status.id = `job-${cardCount}-status`;
    this.element.setAttribute("aria-labelledby", this.title.id);
    this.bar.setAttribute("aria-labelledby", this.status.id);
    this.title.textContent = title;
    this.close.setAttribute("aria-label", `Close ${title} (the job stays under Recent jobs)`);

    this.cancel.addEventListener("click", () => this.cancelJob());
    this.delete.addEventListener("click", () => this.deleteJob());
    this.retry.addEventListener("click", () => {
      this.retry.hidden = true;
      uploadQueue = uploadQueue.then(() => submitCard(this, { madeCurrent: true }));
    });
    this.close.addEventListener("click", () => this.remove());
    this.zip.addEventListener("click", (event) => this.downloadZip(event));
  }

  setState(state) {
    this.element.dataset.state = state;
  }

  setJob(id) {
    this.id = id;
    this.element.dataset.jobId = id;
    cardsByJob.set(id, this);
  }

  renderProgress(percent, text) {
    this.bar.setAttribute("aria-valuenow", String(percent));
    this.bar.setAttribute("aria-valuetext", text);
    this.bar.style.setProperty("--percent", `${percent}%`);
    this.status.textContent = text;
  }

  /** Show a problem of this job; `source` "poll" marks one the next good poll clears. */
  showError(message, source = "job") {
    this.error.textContent = message;
    this.error.dataset.source = source;
    this.error.hidden = false;
  }

  clearError() {
    this.error.textContent = "";
    this.error.hidden = true;
  }

  focus() {
    makeCurrent(this);
    this.element.scrollIntoView({ block: "nearest" });
    this.title.focus({ preventScroll: true });
  }

  onPlay(playing) {
    for (const other of cards()) if (other.mixer !== playing && other.mixer.playing) other.mixer.pause();
    if (current !== this) makeCurrent(this);
  }

  /** Poll the job and show it until it is finished or the card is closed. */
  async follow(job = null) {
    while (!this.closed) {
      if (!job) {
        try {
          job = await apiJson(`/v1/jobs/${this.id}`);
        } catch (error) {
          if (this.closed) return;
          if (error.status === 404) { this.gone(error); return; }
          this.showError(messageOf(error), "poll");
          await sleep(POLL_RETRY_MS);
          continue;
        }
        if (this.closed) return;
      }
      this.render(job);
      offerLifecycle(this);
      if (FINISHED.has(job.status)) return;
      await sleep(job.status === "queued" ? POLL_QUEUED_MS : POLL_RUNNING_MS);
      job = null;
    }
  }

  gone(error) {
    forgetJob(this.id);
    renderRecent();
    this.setState("gone");
    this.renderProgress(0, "Gone");
    this.cancel.hidden = true;
    this.delete.hidden = true;
    this.showError(`That job is gone (deleted or expired) or belongs to another API key: ${error.message}`);
    if (current === this) history.replaceState(null, "", location.pathname);
  }

  render(job) {
    this.lastJob = job;
    this.setState(job.status);
    const { percent, text } = describeJob(job, this.estimator.observe(job, Date.now()));
    this.renderProgress(percent, text);
    const output = job.output || {};
    this.meta.textContent = [
      `${Number(job.duration).toFixed(2)} s`, `${job.samplerate} Hz`,
      `${job.channels} channel${job.channels === 1 ? "" : "s"}`,
      job.workflow ? `${this.preset ? `preset ${this.preset}` : "workflow"}: ${job.workflow.steps.map((step) => step.name).join(" → ")}`
        : `stems: ${job.stems}`,
      output.format ? `out: ${output.format.toUpperCase()} ${output.format === "mp3" ? output.bitrate + " kbit/s" : output.sample_format}, ${output.samplerate} Hz` : "",
      job.expires_at ? `kept until ${new Date(job.expires_at).toLocaleString()}` : "",
    ].filter(Boolean).join(" · ");
    this.cancel.hidden = !(capabilities && capabilities.cancel) || FINISHED.has(job.status);
    this.delete.hidden = !(capabilities && capabilities.delete);
    if (job.workflow) this.renderSteps(job.workflow.steps);
    if (findRecent(job.id)?.status !== job.status) {  // rebuilding the list on every poll would steal focus
      updateRecent(job.id, { status: job.status });
      renderRecent();
    }
    if (job.status === "failed") {
      this.showError(`The separation failed: ${job.error ? job.error.message : "no reason given"}`);
    } else if (!this.error.hidden && this.error.dataset.source === "poll") {
      this.clearError();
    }
    if (job.status === "succeeded" && !this.stemsLoaded) {
      this.stemsLoaded = true;
      this.loadStems(job).catch((error) => !this.closed && this.showError(messageOf(error)));
    }
  }

  /** A workflow job's steps: a row each (made once, in the job's order), updated in place. */
  renderSteps(steps) {
    this.steps.hidden = false;
    for (const step of steps) {
      let row = this.stepRows.get(step.name);
      if (!row) {
        row = new StepRow(step);
        this.stepRows.set(step.name, row);
        this.steps.append(row.element);
      }
      row.render(step);
    }
  }

  async loadStems(job) {
    this.mixerElement.hidden = false;
    this.zip.href = job.zip_url;
    this.zip.download = `${job.id}_stems.zip`;
    const inMemory = job.duration <= WAVEFORM_MAX_SECONDS || Boolean(storedKey());
    const tracks = Object.entries(job.outputs).map(([name, url]) => {
      const element = ui.stemTemplate.content.firstElementChild.cloneNode(true);
      const track = this.mixer.addTrack(element, name);
      return { track, url, filename: `${job.id}_${url.split("/").pop()}` };
    });
    this.mixer.applyMix();
    await Promise.all(tracks.map(({ track, url, filename }) => track.attach(url, filename, inMemory ? fetchBlob : null)));
    if (job.duration > WAVEFORM_MAX_SECONDS) {
      for (const { track } of tracks) track.element.classList.add("no-waveform");
      return;
    }
    for (const { track } of tracks) {
      if (this.closed) return;
      await track.drawWaveform();
    }
  }

  // A plain link cannot carry the API key: with a key, download the zip through fetch.
  async downloadZip(event) {
    if (!storedKey()) return;
    event.preventDefault();
    try {
      const url = URL.createObjectURL(await fetchBlob(this.zip.href));
      const link = Object.assign(document.createElement("a"), { href: url, download: this.zip.download });
      document.body.append(link);
      link.click();
      link.remove();
      setTimeout(() => URL.revokeObjectURL(url), 60_000);
    } catch (error) {
      this.showError(messageOf(error));
    }
  }

  async cancelJob() {
    this.cancel.disabled = true;
    try {
      const job = await apiJson(`/v1/jobs/${this.id}/cancel`, { method: "POST" });
      if (job && !this.closed) this.render(job);
    } catch (error) {
      this.showError(messageOf(error));
    } finally {
      this.cancel.disabled = false;
    }
  }

  // Deleting takes two clicks: the first asks.
  resetDeleteButton() {
    this.delete.textContent = "Delete";
    delete this.delete.dataset.armed;
  }

  async deleteJob() {
    if (!this.delete.dataset.armed) {
      this.delete.dataset.armed = "1";
      this.delete.textContent = "Really delete?";
      setTimeout(() => this.resetDeleteButton(), 4000);
      return;
    }
    this.resetDeleteButton();
    try {
      await apiFetch(`/v1/jobs/${this.id}`, { method: "DELETE" });
    } catch (error) {
      this.showError(messageOf(error));
      return;
    }
    forgetJob(this.id);
    if (this.fingerprint) submissionKeys.delete(this.fingerprint);  // the same file may make a new job
    this.remove();
  }

  /** Take the card off the page (its job stays on the service and under Recent jobs). */
  remove() {
    this.closed = true;
    cardsOnPage.delete(this);
    this.mixer.dispose();
    this.element.remove();
    if (this.id && cardsByJob.get(this.id) === this) cardsByJob.delete(this.id);
    if (current === this) {
      current = null;
      history.replaceState(null, "", location.pathname);
    }
    showWelcome();
    renderRecent();
  }
}

const STEP_STATUS = {
  waiting: "waiting", queued: "queued", running: "running", succeeded: "done", failed: "failed", cancelled: "cancelled",
};

function setBar(bar, percent, text) {
  bar.setAttribute("aria-valuenow", String(percent));
  bar.setAttribute("aria-valuetext", text);
  bar.style.setProperty("--percent", `${percent}%`);
}

/** One step of a workflow job: its name, models and ensemble, status, progress, and its runs. */
class StepRow {
  constructor(step) {
    this.element = ui.stepTemplate.content.firstElementChild.cloneNode(true);
    const part = (selector) => $(selector, this.element);
    this.status = part('[data-role="step-status"]');
    this.bar = part('[data-role="step-progressbar"]');
    this.runs = part('[data-role="runs"]');
    this.element.dataset.step = step.name;
    part('[data-role="step-name"]').textContent = step.name;
    const models = step.models || [];
    part('[data-role="step-models"]').textContent = [
      models.join(" + "),
      models.length > 1 ? `${step.ensemble || "avg_wave"} ensemble${step.weights ? ` (weights ${step.weights.join(", ")})` : ""}` : "",
      step.input && step.input !== "mix" ? `from ${step.input}` : "",
    ].filter(Boolean).join(" · ");
    this.bar.setAttribute("aria-label", `Step ${step.name}`);
    this.runRows = (step.runs || []).map((run) => {
      const item = document.createElement("li");
      item.className = "run";
      item.dataset.model = run.model;
      const name = document.createElement("span");
      name.className = "run-model";
      name.textContent = run.model;
      const state = document.createElement("span");
      state.className = "run-status";
      const bar = document.createElement("div");
      bar.className = "bar";
      bar.setAttribute("role", "progressbar");
      bar.setAttribute("aria-valuemin", "0");
      bar.setAttribute("aria-valuemax", "100");
      bar.setAttribute("aria-label", `${step.name}: ${run.model}`);
      bar.append(Object.assign(document.createElement("div"), { className: "fill" }));
      item.append(name, state, bar);
      this.runs.append(item);
      return { item, state, bar };
    });
  }

  render(step) {
    const percent = Math.round((step.progress || 0) * 100);
    const said = STEP_STATUS[step.status] || step.status;
    this.element.dataset.status = step.status;
    this.status.className = `badge ${step.status}`;
    this.status.textContent = said;
    setBar(this.bar, percent, `${said}, ${percent}%`);
    (step.runs || []).forEach((run, index) => {
      const row = this.runRows[index];
      if (!row) return;
      const runPercent = Math.round((run.progress || 0) * 100);
      const runSaid = STEP_STATUS[run.status] || run.status;
      row.item.dataset.status = run.status;
      row.item.dataset.cached = run.cached ? "true" : "false";
      row.state.textContent = run.cached ? `${runSaid} · from the cache` : `${runSaid} · ${runPercent}%`;
      setBar(row.bar, runPercent, row.state.textContent);
    });
  }
}

function cards() {
  return [...cardsOnPage];
}

function makeCurrent(card) {
  current = card;
  if (card.id && location.hash !== `#job=${card.id}`) history.replaceState(null, "", `#job=${card.id}`);
  renderRecent();
}

/** The welcome card explains the page while no job is on it. */
function showWelcome() {
  document.body.classList.toggle("has-jobs", cardsOnPage.size > 0);
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

async function fetchBlob(url) {
  return (await apiFetch(url)).blob();
}

/** Whether this service has the cancel and delete endpoints (probed once it can tell, never prompting). */
let probing = null;

async function probeCapabilities(jobId) {
  if (capabilities) return capabilities;
  probing ??= Promise.all([allowedMethods(`/v1/jobs/${jobId}/cancel`), allowedMethods(`/v1/jobs/${jobId}`)])
    .then(([cancel, job]) => {
      if (cancel === null || job === null) return null;  // needs a key first: ask again later
      capabilities = { cancel: cancel.has("POST"), delete: job.has("DELETE") };
      document.body.dataset.lifecycle = Object.keys(capabilities).filter((name) => capabilities[name]).join(" ") || "none";
      return capabilities;
    })
    .finally(() => { probing = null; });
  return probing;
}

/** Probe if not known yet, then show every card's buttons. */
function offerLifecycle(card) {
  if (capabilities) return;
  probeCapabilities(card.id).then((known) => {
    if (!known) return;
    for (const shown of cards()) if (shown.lastJob) shown.render(shown.lastJob);
  });
}

/** Show a job's card (making one if the page has none for it) and follow the job. */
function openJob(id) {
  const existing = cardsByJob.get(id);
  if (existing) { existing.focus(); return; }
  const remembered = findRecent(id);
  const card = new JobCard(remembered ? remembered.name : `Job ${id.slice(0, 8)}`);
  card.setJob(id);
  ui.jobs.prepend(card.element);
  showWelcome();
  card.focus();
  card.follow();
}

// The space bar plays or pauses the job that is playing, else the current one.
document.addEventListener("keydown", (event) => {
  if (event.code !== "Space" || event.target.closest("input, select, textarea, button, a, summary")) return;
  const mixer = cards().map((card) => card.mixer).find((candidate) => candidate.playing)
    || (current && !current.closed ? current.mixer : null);
  if (mixer && mixer.ready) {
    event.preventDefault();
    mixer.toggle();
  }
});

// ---- recent jobs --------------------------------------------------------------------

function renderRecent() {
  const entries = loadRecent();
  ui.recentEmpty.hidden = entries.length > 0;
  ui.recent.replaceChildren(...entries.map((entry) => {
    const item = document.createElement("li");
    item.dataset.jobId = entry.id;
    const open = document.createElement("button");
    open.type = "button";
    open.className = "open";
    open.dataset.action = "open";
    if (current && current.id === entry.id) open.setAttribute("aria-current", "true");
    const name = document.createElement("span");
    name.className = "name";
    name.textContent = entry.name || entry.id;
    const detail = document.createElement("span");
    detail.className = "detail";
    detail.textContent = `${entry.stems || ""} · ${new Date(entry.submittedAt || 0).toLocaleString()}`;
    const status = document.createElement("span");
    status.className = `badge ${entry.status || ""}`;
    status.textContent = entry.status || "";
    open.append(name, detail);
    open.addEventListener("click", () => openJob(entry.id));
    const forget = document.createElement("button");
    forget.type = "button";
    forget.className = "forget";
    forget.dataset.action = "forget";
    forget.textContent = "×";
    forget.setAttribute("aria-label", `Remove ${entry.name || entry.id} from this list`);
    forget.addEventListener("click", () => { forgetJob(entry.id); renderRecent(); });
    item.append(open, status, forget);
    return item;
  }));
}

/** Refresh each remembered job's status; drop the ones the service no longer has. */
async function refreshRecent() {
  await Promise.all(loadRecent().map(async (entry) => {
    try {
      const job = await apiJson(`/v1/jobs/${entry.id}`);
      updateRecent(entry.id, { status: job.status });
    } catch (error) {
      if (error.status === 404) forgetJob(entry.id);
    }
  }));
  renderRecent();
}

// ---- start --------------------------------------------------------------------------

function openFromHash() {
  const match = /^#job=([0-9a-f]{32})$/.exec(location.hash);
  if (match && (!current || current.id !== match[1])) openJob(match[1]);
}

window.addEventListener("hashchange", openFromHash);
renderRecent();
refreshRecent();
openFromHash();
document.body.dataset.ready = "true";
