// What the progress line says: percentage, time left, place in the queue.

/**
 * Seconds left for a running job: the service's own `eta_s` when its jobs have that field
 * (null there means "too early to tell"), else extrapolated from the progress made since
 * this page first saw the job running (the page's own clock, so a server clock that
 * differs does not matter); before that, from the job's `started_at`.
 */
const MIN_PROGRESS_FOR_ETA = 0.02;  // before this, model loading dominates and a rate says little

export class EtaEstimator {
  constructor() { this.first = null; }

  /** `job`: the job JSON; `nowMs`: Date.now(). Returns seconds, or null when unknown. */
  observe(job, nowMs) {
    if (job.status !== "running") { this.first = null; return null; }
    if ("eta_s" in job) return typeof job.eta_s === "number" && isFinite(job.eta_s) ? Math.max(0, job.eta_s) : null;
    const progress = job.progress || 0;
    if (this.first === null || progress < this.first.progress) this.first = { progress, nowMs };
    if (progress < MIN_PROGRESS_FOR_ETA) return null;
    const seenFor = (nowMs - this.first.nowMs) / 1000;
    const gained = progress - this.first.progress;
    if (seenFor >= 1 && gained > 0) return (1 - progress) * seenFor / gained;
    const started = Date.parse(job.started_at || "");
    if (progress > 0 && isFinite(started) && nowMs > started) {
      return (1 - progress) * ((nowMs - started) / 1000) / progress;
    }
    return null;
  }
}

/** "about 40 s", "about 3 min 5 s", "about 1 h 20 min". */
export function formatTimeLeft(seconds) {
  const s = Math.max(1, Math.round(seconds));
  if (s < 60) return `about ${s} s`;
  if (s < 3600) {
    const rest = s % 60;
    return `about ${Math.floor(s / 60)} min${rest ? ` ${rest} s` : ""}`;
  }
  const minutes = Math.round((s % 3600) / 60);
  return `about ${Math.floor(s / 3600)} h${minutes ? ` ${minutes} min` : ""}`;
}

/** A position in a track: "1:05.3". */
export function formatClock(seconds) {
  const t = Math.max(0, seconds || 0);
  const minutes = Math.floor(t / 60);
  const rest = (t - minutes * 60).toFixed(1).padStart(4, "0");
  return `${minutes}:${rest}`;
}

/** The status line and bar value (0-100) for a job. */
export function describeJob(job, etaSeconds) {
  const percent = Math.round((job.progress || 0) * 100);
  switch (job.status) {
    case "queued": {
      const where = typeof job.queue_position === "number"
        ? (job.queue_position <= 1 ? "next in line" : `position ${job.queue_position} in the queue`)
        : "waiting for a worker";
      const served = job.waiting_for ? ` · no worker serves model ${job.model} yet` : "";
      return { percent: 0, text: `Queued — ${where}${served}` };
    }
    case "running": {
      const left = etaSeconds == null ? "estimating time left…" : `${formatTimeLeft(etaSeconds)} left`;
      return { percent, text: `Separating — ${percent}% · ${left}` };
    }
    case "succeeded":
      return { percent: 100, text: "Done — 100%" };
    case "failed":
      return { percent, text: "Failed" };
    case "cancelled":
      return { percent, text: "Cancelled" };
    default:
      return { percent, text: job.status };
  }
}
