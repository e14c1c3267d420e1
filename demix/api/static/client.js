// Talking to the /v1 API: the stored API key, readable errors, uploads with progress.

const KEY_STORAGE = "demix.apiKey";

/** An error a person can read: the API's `{"error": {"code", "message"}}`, or what went wrong. */
export class ApiError extends Error {
  constructor(message, { status = 0, code = "error" } = {}) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

export function storedKey() {
  try { return localStorage.getItem(KEY_STORAGE) || ""; } catch { return ""; }
}

export function storeKey(key) {
  try {
    if (key) localStorage.setItem(KEY_STORAGE, key); else localStorage.removeItem(KEY_STORAGE);
  } catch { /* storage disabled: the key lasts this page only */ }
}

function authHeaders() {
  const key = storedKey();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

/** The message of an error response, from its JSON body when it has one. */
export function errorFromBody(status, statusText, text) {
  try {
    const body = JSON.parse(text);
    if (body && body.error && body.error.message) {
      return new ApiError(body.error.message, { status, code: body.error.code || "error" });
    }
  } catch { /* not JSON: a proxy's page, say */ }
  return new ApiError(`The service answered ${status}${statusText ? " " + statusText : ""}.`,
                      { status, code: "http_" + status });
}

/**
 * Asks for an API key when the service answers 401. The page installs the function that
 * shows the key form; it resolves once a key is stored (or rejects if the user gives up).
 */
let askForKey = async (error) => { throw error; };
let pendingKeyRequest = null;

export function onKeyNeeded(handler) { askForKey = handler; }

async function withKey(request) {
  for (;;) {
    try {
      return await request();
    } catch (error) {
      if (!(error instanceof ApiError) || error.status !== 401) throw error;
      // One form for every request that hit 401 at the same time.
      pendingKeyRequest ??= askForKey(error).finally(() => { pendingKeyRequest = null; });
      await pendingKeyRequest;
    }
  }
}

async function fetchOnce(url, { method = "GET", body, headers = {} } = {}) {
  let response;
  try {
    response = await fetch(url, { method, body, headers: { ...authHeaders(), ...headers } });
  } catch {
    throw new ApiError("Cannot reach the demix service. Is it still running?", { code: "network" });
  }
  if (!response.ok) throw errorFromBody(response.status, response.statusText, await response.text());
  return response;
}

/** fetch() with the API key, readable errors, and a key prompt on 401. Resolves to the Response. */
export function apiFetch(url, options = {}) {
  return withKey(() => fetchOnce(url, options));
}

export async function apiJson(url, options = {}) {
  const response = await apiFetch(url, options);
  return response.status === 204 ? null : response.json();
}

/**
 * The methods `url` allows, from an OPTIONS request's `Allow` header: which optional
 * endpoints the service has. Never prompts for a key; null when it cannot tell (401).
 */
export async function allowedMethods(url) {
  try {
    const response = await fetch(url, { method: "OPTIONS", headers: authHeaders() });
    if (response.status === 401) return null;
    if (!response.ok) return new Set();
    return new Set((response.headers.get("Allow") || "").split(",").map((m) => m.trim().toUpperCase()));
  } catch {
    return new Set();
  }
}

/** A random idempotency key (getRandomValues works outside secure contexts too, unlike randomUUID). */
export function newIdempotencyKey() {
  return Array.from(crypto.getRandomValues(new Uint8Array(16)), (b) => b.toString(16).padStart(2, "0")).join("");
}

/**
 * POST a form with upload progress (fetch cannot report it). `onProgress(fraction)`;
 * `headers`: more request headers. Resolves to the parsed JSON body of a 2xx answer.
 */
export function upload(url, formData, onProgress, headers = {}) {
  return withKey(() => new Promise((resolve, reject) => {
    const request = new XMLHttpRequest();
    request.open("POST", url);
    for (const [name, value] of Object.entries({ ...authHeaders(), ...headers })) {
      request.setRequestHeader(name, value);
    }
    request.upload.onprogress = (event) => {
      if (event.lengthComputable) onProgress(event.loaded / event.total);
    };
    request.onload = () => {
      if (request.status >= 200 && request.status < 300) {
        try { resolve(JSON.parse(request.responseText)); } catch {
          reject(new ApiError("The service answered with something that is not JSON."));
        }
      } else {
        reject(errorFromBody(request.status, request.statusText, request.responseText));
      }
    };
    request.onerror = () => reject(new ApiError(
      "The upload was cut off. The file may be over the service's size limit, or the service stopped.",
      { code: "network" }));
    request.send(formData);
  }));
}
