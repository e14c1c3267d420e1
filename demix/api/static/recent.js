// Recent jobs, kept in this browser's localStorage (newest first).

const STORAGE = "demix.recentJobs";
const LIMIT = 20;

export function loadRecent() {
  try {
    const list = JSON.parse(localStorage.getItem(STORAGE) || "[]");
    return Array.isArray(list) ? list.filter((entry) => entry && typeof entry.id === "string") : [];
  } catch {
    return [];
  }
}

function save(list) {
  try { localStorage.setItem(STORAGE, JSON.stringify(list.slice(0, LIMIT))); } catch { /* storage off or full */ }
}

/** Add or move a job to the top. `entry`: {id, name, stems, submittedAt, status}. */
export function rememberJob(entry) {
  save([entry, ...loadRecent().filter((other) => other.id !== entry.id)]);
}

export function updateRecent(id, fields) {
  save(loadRecent().map((entry) => (entry.id === id ? { ...entry, ...fields } : entry)));
}

export function forgetJob(id) {
  save(loadRecent().filter((entry) => entry.id !== id));
}

export function findRecent(id) {
  return loadRecent().find((entry) => entry.id === id) || null;
}
