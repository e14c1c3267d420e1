// The page: upload form, job progress, the stem mixer, recent jobs, errors, API key prompt.

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
  submit: $("#job-form button[type=submit]"),
  format: $("#format"),
  sampleFormat: $("#sample_format"),
  samplerate: $("#samplerate"),
  bitrate: $("#bitrate"),
  error: $('[data-role="error"]'),
  keyForm: $('[data-role="api-key"]'),
  keyReason: $('[data-role="api-key-reason"]'),
  job: $('[data-role="job"]'),
  jobTitle: $('[data-role="job-title"]'),
  jobMeta: $('[data-role="job-meta"]'),
  bar: $('[data-role="progressbar"]'),
  status: $('[data-role="status"]'),
  cancel: $('[data-action="cancel"]'),
  delete: $('[data-action="delete"]'),
  mixer: $('[data-role="mixer"]'),
  zip: $('[data-role="zip"]'),
  recent: $('[data-role="recent"]'),
  recentEmpty: $('[data-role="recent-empty"]'),
  stemTemplate: $("#stem-template"),
};
const mixer = new Mixer(ui.mixer);

// ---- errors -------------------------------------------------------------------------

/** Show a message in the error box; `source` "job" marks one the next good poll may clear. */
function showError(message, source = "page") {
  ui.error.textContent = message;
  ui.error.dataset.source = source;
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

function chosenFile() {
  return ui.file.files && ui.file.files[0];
}

function fileProblem(file) {
  if (!file) return "Choose a song first.";
  if (file.size > limits.uploadBytes) {
    return `${file.name} is ${formatBytes(file.size)}; this service accepts files up to ${limits.uploadMb} MiB.`;
  }
  return null;
}

function onFileChosen() {
  const file = chosenFile();
  ui.fileName.textContent = file ? `${file.name} (${formatBytes(file.size)})` : "Drop a song here";
  ui.dropzone.classList.toggle("has-file", Boolean(file));
  const problem = file && fileProblem(file);
  if (problem) showError(problem); else clearError();
}

ui.file.addEventListener("change", onFileChosen);
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
    onFileChosen();
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

// One Idempotency-Key per file and options: sending the same again (after a 401, or an
// upload whose answer was lost) gets the job the first try created where the service
// supports the header, instead of a second job. Choosing anything else starts a new key.
let submissionKey = null;
ui.form.addEventListener("change", () => { submissionKey = null; });

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

function jobForm(file) {
  const data = new FormData();
  data.append("file", file, file.name);
  for (const element of ui.form.elements) {
    if (element.tagName === "SELECT" && !element.disabled && element.value !== "") {
      data.append(element.name, element.value);
    }
  }
  return data;
}

ui.form.addEventListener("submit", async (event) => {
  event.preventDefault();
  clearError();
  const file = chosenFile();
  const problem = fileProblem(file);
  if (problem) { showError(problem); ui.file.focus(); return; }
  ui.submit.disabled = true;
  stopFollowing();
  showJobSection(file.name);
  renderProgress(0, `Uploading ${file.name} — 0%`);
  try {
    submissionKey ??= newIdempotencyKey();
    const job = await upload("/v1/jobs", jobForm(file), (fraction) => {
      const percent = Math.round(fraction * 100);
      renderProgress(percent, percent < 100 ? `Uploading ${file.name} — ${percent}%`
                                            : `Uploaded ${file.name}; the service is checking it…`);
    }, { "Idempotency-Key": submissionKey });
    rememberJob({ id: job.id, name: file.name, stems: job.stems, submittedAt: Date.now(), status: job.status });
    renderRecent();
    openJob(job.id, job);
  } catch (error) {
    ui.job.hidden = true;
    showError(messageOf(error));
  } finally {
    ui.submit.disabled = false;
  }
});

// ---- one job ------------------------------------------------------------------------

let following = null;  // {id, estimator, stemsLoaded, lastJob} of the job on screen
let capabilities = null;

function stopFollowing() {
  following = null;
  mixer.clear();
  ui.mixer.hidden = true;
  ui.cancel.hidden = true;
  ui.delete.hidden = true;
  resetDeleteButton();
}

function showJobSection(title) {
  ui.job.hidden = false;
  ui.jobTitle.textContent = title;
  ui.jobMeta.textContent = "";
}

function renderProgress(percent, text) {
  ui.bar.setAttribute("aria-valuenow", String(percent));
  ui.bar.setAttribute("aria-valuetext", text);
  ui.bar.style.setProperty("--percent", `${percent}%`);
  ui.status.textContent = text;
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

/** Probe if not known yet, then show the job's buttons. */
function offerLifecycle(state) {
  if (capabilities) return;
  probeCapabilities(state.id).then((known) => known && following === state && state.lastJob
                                   && renderJob(state, state.lastJob));
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/** Show a job and follow it until it is finished. */
async function openJob(id, job = null) {
  stopFollowing();
  clearError();
  const state = { id, estimator: new EtaEstimator(), stemsLoaded: false };
  following = state;
  if (location.hash !== `#job=${id}`) history.replaceState(null, "", `#job=${id}`);
  const remembered = findRecent(id);
  showJobSection(remembered ? remembered.name : `Job ${id.slice(0, 8)}`);
  renderRecent();
  while (following === state) {
    if (!job) {
      try {
        job = await apiJson(`/v1/jobs/${id}`);
      } catch (error) {
        if (following !== state) return;
        if (error.status === 404) {
          forgetJob(id);
          renderRecent();
          ui.job.hidden = true;
          following = null;
          history.replaceState(null, "", location.pathname);
          showError(`That job is gone (deleted or expired) or belongs to another API key: ${error.message}`);
          return;
        }
        showError(messageOf(error), "job");
        await sleep(POLL_RETRY_MS);
        continue;
      }
      if (following !== state) return;
    }
    renderJob(state, job);
    offerLifecycle(state);
    if (FINISHED.has(job.status)) return;
    await sleep(job.status === "queued" ? POLL_QUEUED_MS : POLL_RUNNING_MS);
    job = null;
  }
}

function renderJob(state, job) {
  state.lastJob = job;
  const { percent, text } = describeJob(job, state.estimator.observe(job, Date.now()));
  renderProgress(percent, text);
  const output = job.output || {};
  ui.jobMeta.textContent = [
    `${Number(job.duration).toFixed(2)} s`, `${job.samplerate} Hz`,
    `${job.channels} channel${job.channels === 1 ? "" : "s"}`, `stems: ${job.stems}`,
    output.format ? `out: ${output.format.toUpperCase()} ${output.format === "mp3" ? output.bitrate + " kbit/s" : output.sample_format}, ${output.samplerate} Hz` : "",
    job.expires_at ? `kept until ${new Date(job.expires_at).toLocaleString()}` : "",
  ].filter(Boolean).join(" · ");
  ui.cancel.hidden = !(capabilities && capabilities.cancel) || FINISHED.has(job.status);
  ui.delete.hidden = !(capabilities && capabilities.delete);
  if (findRecent(job.id)?.status !== job.status) {  // rebuilding the list on every poll would steal focus
    updateRecent(job.id, { status: job.status });
    renderRecent();
  }
  if (job.status === "failed") {
    showError(`The separation failed: ${job.error ? job.error.message : "no reason given"}`, "job");
  } else if (!ui.error.hidden && ui.error.dataset.source === "job") {
    clearError();
  }
  if (job.status === "succeeded" && !state.stemsLoaded) {
    state.stemsLoaded = true;
    loadStems(state, job).catch((error) => following === state && showError(messageOf(error)));
  }
}

async function fetchBlob(url) {
  return (await apiFetch(url)).blob();
}

async function loadStems(state, job) {
  ui.mixer.hidden = false;
  ui.zip.href = job.zip_url;
  ui.zip.download = `${job.id}_stems.zip`;
  const inMemory = job.duration <= WAVEFORM_MAX_SECONDS || Boolean(storedKey());
  const tracks = Object.entries(job.outputs).map(([name, url]) => {
    const element = ui.stemTemplate.content.firstElementChild.cloneNode(true);
    const track = mixer.addTrack(element, name);
    return { track, url, filename: `${job.id}_${url.split("/").pop()}` };
  });
  mixer.applyMix();
  await Promise.all(tracks.map(({ track, url, filename }) => track.attach(url, filename, inMemory ? fetchBlob : null)));
  if (job.duration > WAVEFORM_MAX_SECONDS) {
    for (const { track } of tracks) track.element.classList.add("no-waveform");
    return;
  }
  for (const { track } of tracks) {
    if (following !== state) return;
    await track.drawWaveform();
  }
}

// A plain link cannot carry the API key: with a key, download the zip through fetch.
ui.zip.addEventListener("click", async (event) => {
  if (!storedKey()) return;
  event.preventDefault();
  try {
    const url = URL.createObjectURL(await fetchBlob(ui.zip.href));
    const link = Object.assign(document.createElement("a"), { href: url, download: ui.zip.download });
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(url), 60_000);
  } catch (error) {
    showError(messageOf(error));
  }
});

ui.cancel.addEventListener("click", async () => {
  const state = following;
  if (!state) return;
  ui.cancel.disabled = true;
  try {
    const job = await apiJson(`/v1/jobs/${state.id}/cancel`, { method: "POST" });
    if (job && following === state) renderJob(state, job);
  } catch (error) {
    showError(messageOf(error));
  } finally {
    ui.cancel.disabled = false;
  }
});

// Deleting takes two clicks: the first asks.
function resetDeleteButton() {
  ui.delete.textContent = "Delete";
  delete ui.delete.dataset.armed;
}

ui.delete.addEventListener("click", async () => {
  const state = following;
  if (!state) return;
  if (!ui.delete.dataset.armed) {
    ui.delete.dataset.armed = "1";
    ui.delete.textContent = "Really delete?";
    setTimeout(resetDeleteButton, 4000);
    return;
  }
  resetDeleteButton();
  try {
    await apiFetch(`/v1/jobs/${state.id}`, { method: "DELETE" });
    forgetJob(state.id);
    stopFollowing();
    ui.job.hidden = true;
    history.replaceState(null, "", location.pathname);
    renderRecent();
  } catch (error) {
    showError(messageOf(error));
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
    if (following && following.id === entry.id) open.setAttribute("aria-current", "true");
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
  if (match && (!following || following.id !== match[1])) openJob(match[1]);
}

window.addEventListener("hashchange", openFromHash);
renderRecent();
refreshRecent();
openFromHash();
document.body.dataset.ready = "true";
