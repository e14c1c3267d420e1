"""The web page in a real browser (headless Debian Chromium driven by Playwright) against
a real `demix up` with the tiny model: upload, progress, stems that play in sync, mute and
solo, downloads, recent jobs, readable errors."""
from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import zipfile
from pathlib import Path

import pytest
import soundfile as sf

from testkit.synthetic_audio import write_wav
from tests.support.demix_up import demix_up

pytestmark = pytest.mark.processes

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
NO_CHROMIUM = ("no Chromium found: the browser tests need Debian's chromium package "
               "(apt-get install -y chromium, which .ci/run does)")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
JOB_TIMEOUT_MS = 240_000  # a loaded 2-core machine: generous

INPUT_SECONDS = 4.0
INPUT_RATE = 44100


@pytest.fixture(scope="module")
def browser():
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(NO_CHROMIUM)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def service_url(tiny_model_repo, tmp_path_factory):
    with demix_up(tmp_path_factory.mktemp("web")) as (url, _output, _marker):
        yield url


@contextlib.contextmanager
def watched_page(browser, base_url: str):
    """A fresh browser context's page; fails the test if the page throws or logs an error
    (a Content-Security-Policy violation, say) other than an HTTP error status it handles."""
    context = browser.new_context(base_url=base_url, accept_downloads=True)
    page = context.new_page()
    problems: list = []
    page.on("pageerror", lambda error: problems.append(f"uncaught: {error}"))
    page.on("console", lambda message: message.type == "error"
            and not message.text.startswith("Failed to load resource: the server responded with a status of")
            and problems.append(f"console: {message.text}"))
    page.set_default_timeout(30_000)
    yield page
    context.close()
    assert not problems, problems


@pytest.fixture
def page(browser, service_url):
    with watched_page(browser, service_url) as page:
        yield page


@pytest.fixture(scope="module")
def song(tmp_path_factory) -> Path:
    return write_wav(tmp_path_factory.mktemp("songs") / "song.wav", INPUT_RATE, 2, seconds=INPUT_SECONDS)


def open_page(page) -> None:
    page.goto("/")
    page.wait_for_selector("body[data-ready=true]")


def stem_state(page) -> list[dict]:
    return page.eval_on_selector_all("audio[data-stem]", """els => els.map(a => ({
        stem: a.dataset.stem, duration: a.duration, muted: a.muted, paused: a.paused,
        time: a.currentTime, ready: a.readyState}))""")


def separate_through_page(page, path: Path, stems: str, expected: set[str]) -> None:
    """Submit `path` with the form and wait until every stem's <audio> knows its duration
    and every waveform is drawn."""
    page.set_input_files("input[type=file][name=file]", str(path))
    page.select_option("select[name=stems]", stems)
    page.click("button[type=submit]")
    page.wait_for_function(
        """count => { const audios = [...document.querySelectorAll('audio[data-stem]')];
                      return audios.length === count && audios.every(a => a.readyState >= 1 && isFinite(a.duration)); }""",
        arg=len(expected), timeout=JOB_TIMEOUT_MS)
    page.wait_for_function(
        "() => [...document.querySelectorAll('.stem')].every(s => s.dataset.waveform)", timeout=60_000)
    assert {state["stem"] for state in stem_state(page)} == expected


def test_upload_progress_playback_and_zip(page, song, tmp_path):
    open_page(page)
    # Record every state of the progress bar as the page shows it.
    page.evaluate("""() => {
        window.progressSeen = [];
        const bar = document.querySelector('[data-role=progressbar]');
        const status = document.querySelector('[data-role=status]');
        new MutationObserver(() => window.progressSeen.push([Number(bar.getAttribute('aria-valuenow')), status.textContent]))
            .observe(status, {childList: true, characterData: true, subtree: true});
    }""")
    separate_through_page(page, song, "all", {"drums", "bass", "other", "vocals"})

    for state in stem_state(page):
        assert state["duration"] == pytest.approx(INPUT_SECONDS, abs=0.005), state
    assert page.text_content("[data-role=status]") == "Done — 100%"
    assert page.get_attribute("[data-role=progressbar]", "aria-valuenow") == "100"
    seen = page.evaluate("window.progressSeen")
    assert any(text.startswith("Uploading song.wav") for _, text in seen), seen
    job_phase = [value for value, text in seen if text.startswith(("Queued", "Separating", "Done"))]
    assert job_phase and job_phase == sorted(job_phase) and job_phase[-1] == 100, seen
    assert page.is_hidden("[data-role=error]")
    assert all(page.eval_on_selector_all(".stem", "els => els.map(e => e.dataset.waveform === 'drawn')"))

    # One transport: every stem plays, together.
    page.click("[data-action=play]")
    page.wait_for_function("""() => [...document.querySelectorAll('audio[data-stem]')]
                              .every(a => !a.paused && a.currentTime > 0.3)""")
    spreads = page.evaluate("""async () => {
        const spreads = [];
        for (let i = 0; i < 8; i++) {
            const times = [...document.querySelectorAll('audio[data-stem]')].map(a => a.currentTime);
            spreads.push(Math.max(...times) - Math.min(...times));
            await new Promise(resolve => setTimeout(resolve, 100));
        }
        return spreads;
    }""")
    assert max(spreads) < 0.15, spreads  # the mixer re-aligns past 40 ms; slack for a loaded machine
    page.click("[data-action=play]")  # pause
    assert all(state["paused"] for state in stem_state(page))

    # Seeking moves every stem.
    page.eval_on_selector("[data-role=seek]",
                          "el => { el.value = '2.5'; el.dispatchEvent(new Event('input')); }")
    for state in stem_state(page):
        assert state["time"] == pytest.approx(2.5, abs=0.01), state

    # Each stem's own download link, and the zip with every stem.
    with page.expect_download() as download:
        page.click(".stem:has(audio[data-stem=vocals]) [data-role=download]")
    assert download.value.suggested_filename.endswith("_vocals.wav")
    assert sf.info(download.value.path()).frames == INPUT_SECONDS * INPUT_RATE
    with page.expect_download() as download:
        page.click("[data-role=zip]")
    archive = zipfile.ZipFile(download.value.path())
    assert sorted(archive.namelist()) == ["bass.wav", "drums.wav", "other.wav", "vocals.wav"]
    for name in archive.namelist():
        assert sf.info(io.BytesIO(archive.read(name))).frames == INPUT_SECONDS * INPUT_RATE

    screenshot = os.environ.get("WEB_PAGE_SCREENSHOT")  # not DEMIX_*: conftest clears those
    if screenshot:  # how docs/screenshot.png is made (README)
        page.set_viewport_size({"width": 1100, "height": 900})
        page.evaluate("window.scrollTo(0, 0)")
        page.screenshot(path=screenshot, full_page=True)


def test_with_an_api_key_everything_is_fetched_with_it(page, song):
    """The service's key check is simulated in front of the real one (keys belong to the
    API's own tests): every /v1 request without `Authorization: Bearer sesame` gets 401.
    The stems (which a plain <audio> could not fetch with a key) and the zip still work."""
    refused: list = []

    def require_key(route):
        if route.request.headers.get("authorization") == "Bearer sesame":
            return route.continue_()
        refused.append(route.request.url)
        route.fulfill(status=401, json={"error": {"code": "unauthorized", "message": "the API key is not valid"}})

    page.route("**/v1/**", require_key)
    open_page(page)
    page.evaluate("localStorage.setItem('demix.apiKey', 'sesame')")
    separate_through_page(page, song, "drums", {"drums", "no_drums"})
    assert page.is_hidden("[data-role=api-key]")
    for state in stem_state(page):
        assert state["duration"] == pytest.approx(INPUT_SECONDS, abs=0.005), state
    with page.expect_download() as download:
        page.click("[data-role=zip]")
    assert sorted(zipfile.ZipFile(download.value.path()).namelist()) == ["drums.wav", "no_drums.wav"]
    assert refused == []


def test_output_options_mute_solo_and_recent_jobs_on_a_phone(page, song):
    page.set_viewport_size({"width": 360, "height": 740})
    open_page(page)
    page.click("summary")  # "Output options"
    page.select_option("select[name=format]", "flac")
    page.select_option("select[name=samplerate]", "22050")
    separate_through_page(page, song, "vocals", {"vocals", "no_vocals"})
    assert page.evaluate("document.scrollingElement.scrollWidth") <= 360  # nothing sticks out sideways
    assert "out: FLAC pcm16, 22050 Hz" in page.text_content("[data-role=job-meta]")
    for state in stem_state(page):
        assert state["duration"] == pytest.approx(INPUT_SECONDS, abs=0.005), state
    assert page.get_attribute(".stem:has(audio[data-stem=vocals]) [data-role=download]", "download").endswith(
        "_vocals.flac")

    def muted() -> dict:
        return {state["stem"]: state["muted"] for state in stem_state(page)}

    page.click("[aria-label='Mute vocals']")
    assert muted() == {"vocals": True, "no_vocals": False}
    page.click("[aria-label='Solo no_vocals']")
    assert muted() == {"vocals": True, "no_vocals": False}
    page.click("[aria-label='Solo vocals']")  # solo wins over mute
    assert muted() == {"vocals": False, "no_vocals": False}
    page.click("[aria-label='Solo no_vocals']")
    assert muted() == {"vocals": False, "no_vocals": True}
    page.click("[aria-label='Solo vocals']")
    page.click("[aria-label='Mute vocals']")
    assert muted() == {"vocals": False, "no_vocals": False}

    # The job is remembered by the browser; a job the service no longer has is dropped.
    job_id = page.eval_on_selector("[data-role=recent] li", "li => li.dataset.jobId")
    page.evaluate("""() => {
        const list = JSON.parse(localStorage.getItem('demix.recentJobs'));
        list.push({id: 'f'.repeat(32), name: 'gone.wav', stems: 'all', submittedAt: 0, status: 'succeeded'});
        localStorage.setItem('demix.recentJobs', JSON.stringify(list));
    }""")
    page.goto("/")  # no #job: a fresh page
    page.wait_for_selector("body[data-ready=true]")
    page.wait_for_function("() => document.querySelectorAll('[data-role=recent] li').length === 1")
    assert page.eval_on_selector("[data-role=recent] li", "li => li.dataset.jobId") == job_id
    assert "song.wav" in page.text_content("[data-role=recent] li")
    two_stems_loaded = """() => document.querySelectorAll('audio[data-stem]').length === 2
                              && [...document.querySelectorAll('audio[data-stem]')].every(a => a.readyState >= 1)"""
    page.click("[data-role=recent] li [data-action=open]")
    page.wait_for_function(two_stems_loaded, timeout=60_000)
    for state in stem_state(page):
        assert state["duration"] == pytest.approx(INPUT_SECONDS, abs=0.005), state

    # A job's address opens it.
    page.goto("about:blank")
    page.goto(f"/#job={job_id}")
    page.wait_for_function(two_stems_loaded, timeout=60_000)
    assert page.text_content("[data-role=job-title]") == "song.wav"


@pytest.mark.parametrize("name, content, expected", [
    ("notes.txt", b"these are my lyrics, not audio\n", "its first bytes"),
    ("song.mp3", b"ID3\x04\x00\x00\x00\x00\x00\x00" + bytes(2000), "an MP3 file (it starts with an ID3 tag)"),
    ("broken.wav", b"RIFF\x24\x00\x00\x00WAVEfmt \x10\x00\x00\x00" + bytes(8), "422"),
])
def test_bad_upload_shows_the_services_message(page, tmp_path, name, content, expected):
    path = tmp_path / name
    path.write_bytes(content)
    open_page(page)
    responses = []
    page.on("response", lambda response: response.url.endswith("/v1/jobs") and responses.append(response))
    page.set_input_files("input[type=file][name=file]", str(path))
    page.click("button[type=submit]")
    error = page.wait_for_selector("[data-role=error]:not([hidden])")
    (response,) = responses
    assert response.status in (415, 422)
    body = response.json()["error"]
    assert error.text_content() == body["message"]  # the message itself, not JSON
    assert expected in body["message"] or expected == str(response.status)
    assert page.locator("audio[data-stem]").count() == 0


# ---- against the API alone (`idle_server`: a 1 MiB upload limit, a queue no worker takes) ----

@pytest.fixture
def idle_page(browser, idle_server):
    with watched_page(browser, idle_server.url) as page:
        yield page


def job_requests(page) -> list:
    """Requests the page makes to submit a job, recorded from now on."""
    seen: list = []
    page.on("request", lambda request: request.method == "POST" and request.url.endswith("/v1/jobs")
            and seen.append(request))
    return seen


def test_a_queued_job_says_so(idle_page, tmp_path):
    path = write_wav(tmp_path / "waiting.wav", 22050, 1, seconds=0.5)
    # A service without the cancel and delete endpoints (the probe is all that changes).
    idle_page.route(re.compile(r"/v1/jobs/[0-9a-f]{32}(/cancel)?$"), lambda route: route.fulfill(
        status=404, json={"error": {"code": "not_found", "message": "not found"}})
        if route.request.method == "OPTIONS" else route.continue_())
    open_page(idle_page)
    idle_page.set_input_files("input[type=file][name=file]", str(path))
    idle_page.click("button[type=submit]")
    idle_page.wait_for_function(
        "() => document.querySelector('[data-role=status]').textContent.startsWith('Queued — ')")
    assert idle_page.get_attribute("[data-role=progressbar]", "aria-valuenow") == "0"
    assert idle_page.is_hidden("[data-role=error]")
    idle_page.wait_for_selector("body[data-lifecycle]", state="attached")  # the probe is done
    assert idle_page.get_attribute("body", "data-lifecycle") == "none"
    assert idle_page.locator("[data-action=cancel]").is_hidden()
    assert idle_page.locator("[data-action=delete]").is_hidden()


def test_output_options_offer_only_what_can_be_written(idle_page):
    open_page(idle_page)
    idle_page.click("summary")

    def disabled(select: str) -> list[str]:
        return idle_page.eval_on_selector(select, """s => s.disabled ? ['*'] :
            [...s.options].filter(o => o.disabled).map(o => o.value)""")

    assert disabled("select[name=bitrate]") == ["*"]  # WAV: no bitrate
    idle_page.select_option("select[name=samplerate]", "96000")
    idle_page.select_option("select[name=format]", "mp3")
    assert disabled("select[name=sample_format]") == ["*"]
    assert disabled("select[name=bitrate]") == []
    assert set(disabled("select[name=samplerate]")) == {"88200", "96000", "176400", "192000"}
    assert idle_page.input_value("select[name=samplerate]") == "input"
    idle_page.select_option("select[name=format]", "flac")
    assert disabled("select[name=sample_format]") == ["float32"]
    assert disabled("select[name=samplerate]") == []


def test_a_dropped_file_is_chosen(idle_page):
    open_page(idle_page)
    idle_page.eval_on_selector("[data-role=dropzone]", """zone => {
        const files = new DataTransfer();
        files.items.add(new File([new Uint8Array(2048)], 'dropped.wav', {type: 'audio/wav'}));
        zone.dispatchEvent(new DragEvent('drop', {dataTransfer: files, bubbles: true, cancelable: true}));
    }""")
    assert idle_page.eval_on_selector("input[type=file][name=file]", "input => input.files[0].name") == "dropped.wav"
    assert idle_page.text_content("[data-role=file-name]") == "dropped.wav (2 KiB)"


def test_a_failed_job_shows_why(idle_page, tmp_path):
    """A job the worker failed (simulated here: no worker takes this queue) shows its error's message."""
    path = write_wav(tmp_path / "fails.wav", 22050, 1, seconds=0.5)
    failure = {"code": "model_unavailable", "message": "no weights for htdemucs: run demix models pull"}

    def fail(route):
        if route.request.method != "GET":
            return route.continue_()
        route.fulfill(json={**route.fetch().json(), "status": "failed", "error": failure})

    idle_page.route(re.compile(r"/v1/jobs/[0-9a-f]{32}$"), fail)
    open_page(idle_page)
    idle_page.set_input_files("input[type=file][name=file]", str(path))
    idle_page.click("button[type=submit]")
    error = idle_page.wait_for_selector("[data-role=error]:not([hidden])")
    assert error.text_content() == f"The separation failed: {failure['message']}"
    assert idle_page.text_content("[data-role=status]") == "Failed"
    assert idle_page.text_content("[data-role=recent] .badge") == "failed"


def test_the_same_submission_again_reuses_its_idempotency_key(idle_page, tmp_path):
    path = write_wav(tmp_path / "twice.wav", 22050, 1, seconds=0.5)
    open_page(idle_page)
    submitted = job_requests(idle_page)

    def submit() -> None:
        count = len(submitted)
        idle_page.click("button[type=submit]")
        idle_page.wait_for_function(
            "() => document.querySelector('[data-role=status]').textContent.startsWith('Queued — ')")
        assert len(submitted) == count + 1

    idle_page.set_input_files("input[type=file][name=file]", str(path))
    submit()
    submit()
    idle_page.select_option("select[name=stems]", "bass")
    submit()
    first, again, changed = (request.headers["idempotency-key"] for request in submitted)
    assert first == again != changed


def test_a_file_over_the_limit_is_refused_before_it_is_sent(idle_page, tmp_path):
    path = tmp_path / "big.wav"
    path.write_bytes(bytes(int(1.5 * 1024 * 1024)))
    open_page(idle_page)
    submitted = job_requests(idle_page)
    idle_page.set_input_files("input[type=file][name=file]", str(path))
    assert idle_page.text_content("[data-role=error]") == \
        "big.wav is 1.5 MiB; this service accepts files up to 1 MiB."
    idle_page.click("button[type=submit]")
    assert idle_page.is_visible("[data-role=error]")
    assert submitted == []


def test_the_services_413_is_shown_when_the_page_does_not_know_the_limit(idle_page, tmp_path):
    """A limit the page does not know of (a proxy's, say): the service's 413 message shows."""
    path = write_wav(tmp_path / "long.wav", 44100, 2, seconds=6.0)  # ~1 MiB of audio over the limit
    idle_page.route("**/", lambda route: route.fulfill(
        response=route.fetch(), body=route.fetch().text().replace('data-max-upload-bytes="1048576"',
                                                                  'data-max-upload-bytes=""')))
    open_page(idle_page)
    idle_page.set_input_files("input[type=file][name=file]", str(path))
    idle_page.click("button[type=submit]")
    error = idle_page.wait_for_selector("[data-role=error]:not([hidden])")
    assert "1 MiB limit" in error.text_content(), error.text_content()


def test_asks_for_an_api_key_on_401_and_sends_it(idle_page, tmp_path):
    """The service's side is simulated here (keys belong to the API's own tests): a request
    without `Authorization: Bearer sesame` gets the API's 401 JSON error."""
    path = write_wav(tmp_path / "keyed.wav", 22050, 1, seconds=0.5)
    authorizations: list = []

    idempotency_keys: list = []

    def require_key(route):
        authorization = route.request.headers.get("authorization")
        authorizations.append(authorization)
        if route.request.method == "POST":
            idempotency_keys.append(route.request.headers.get("idempotency-key"))
        if authorization != "Bearer sesame":
            route.fulfill(status=401, content_type="application/json",
                          body='{"error": {"code": "unauthorized", "message": "a valid API key is required"}}')
        else:
            route.continue_()

    idle_page.route("**/v1/**", require_key)
    open_page(idle_page)
    idle_page.set_input_files("input[type=file][name=file]", str(path))
    idle_page.click("button[type=submit]")
    idle_page.wait_for_selector("[data-role=api-key]:not([hidden])")
    assert "needs an API key" in idle_page.text_content("[data-role=api-key]")
    idle_page.fill("#api_key", "wrong")
    idle_page.click("[data-action=save-key]")
    idle_page.wait_for_function("() => document.querySelector('[data-role=api-key-reason]').textContent"
                                ".includes('refused (the service says: a valid API key is required)')")
    assert idle_page.is_visible("[data-role=api-key]")
    idle_page.fill("#api_key", "sesame")
    idle_page.click("[data-action=save-key]")
    idle_page.wait_for_function(
        "() => document.querySelector('[data-role=status]').textContent.startsWith('Queued — ')")
    assert authorizations[0] is None and "Bearer wrong" in authorizations and authorizations[-1] == "Bearer sesame"
    assert idle_page.evaluate("localStorage.getItem('demix.apiKey')") == "sesame"
    # Every try of this one submission carried the same Idempotency-Key: at most one job.
    assert len(idempotency_keys) == 3 and len(set(idempotency_keys)) == 1
    assert re.fullmatch(r"[0-9a-f]{32}", idempotency_keys[0])
    assert idle_page.is_hidden("[data-role=error]")


def test_cancel_and_delete_are_offered_where_the_service_has_them(idle_page, tmp_path):
    """The endpoints are simulated (they belong to the job lifecycle's own tests): the page
    offers Cancel when `OPTIONS .../cancel` allows POST and Delete when the job allows DELETE."""
    path = write_wav(tmp_path / "cancel.wav", 22050, 1, seconds=0.5)
    calls: list = []

    def lifecycle(route):
        request = route.request
        calls.append((request.method, request.url.split("/v1/jobs/")[1]))
        if request.method == "OPTIONS":
            route.fulfill(status=200, headers={"Allow": "POST, DELETE, GET, HEAD, OPTIONS"})
        elif request.method == "POST":  # cancel: answer the job as cancelled
            job = route.fetch(url=request.url.rsplit("/", 1)[0], method="GET").json()
            route.fulfill(json={**job, "status": "cancelled"})
        elif request.method == "DELETE":
            route.fulfill(status=204)
        else:
            route.continue_()

    idle_page.route(re.compile(r"/v1/jobs/[0-9a-f]{32}(/cancel)?$"),
                    lambda route: route.continue_() if route.request.method == "GET" else lifecycle(route))
    open_page(idle_page)
    idle_page.set_input_files("input[type=file][name=file]", str(path))
    idle_page.click("button[type=submit]")
    idle_page.click("[data-action=cancel]")
    idle_page.wait_for_function("() => document.querySelector('[data-role=status]').textContent === 'Cancelled'")
    assert idle_page.locator("[data-action=cancel]").is_hidden()
    job_id = idle_page.eval_on_selector("[data-role=recent] li", "li => li.dataset.jobId")
    idle_page.click("[data-action=delete]")
    assert idle_page.text_content("[data-action=delete]") == "Really delete?"
    idle_page.click("[data-action=delete]")
    idle_page.wait_for_selector("[data-role=job]", state="hidden")
    assert ("DELETE", job_id) in calls and ("POST", f"{job_id}/cancel") in calls
    assert idle_page.locator("[data-role=recent] li").count() == 0


def test_progress_line_and_time_left(idle_page):
    """The progress line's wording and the time-left estimate, run in the page's own module."""
    open_page(idle_page)
    result = idle_page.evaluate("""async () => {
        const { EtaEstimator, describeJob } = await import('/static/progress.js');
        const estimator = new EtaEstimator();
        const t0 = Date.parse('2026-01-01T00:00:10Z');
        const running = (progress, extra = {}) => ({status: 'running', progress,
                                                   started_at: '2026-01-01T00:00:00Z', ...extra});
        return {
            fromStart: estimator.observe(running(0.25), t0),            // 10 s for 25%: 30 s left
            fromSeen: estimator.observe(running(0.5), t0 + 2000),       // 25% more in 2 s: 4 s left
            fromService: estimator.observe(running(0.5, {eta_s: 7}), t0 + 3000),
            serviceTooEarly: estimator.observe(running(0.01, {eta_s: null}), t0 + 4000),
            unknown: new EtaEstimator().observe(running(0), t0),
            tooEarly: new EtaEstimator().observe(running(0.01), t0),
            running: describeJob(running(0.5), 125).text,
            estimating: describeJob(running(0.05), null).text,
            queued: describeJob({status: 'queued', progress: 0}, null).text,
            third: describeJob({status: 'queued', progress: 0, queue_position: 3}, null).text,
            next: describeJob({status: 'queued', progress: 0, queue_position: 1}, null).text,
            done: describeJob({status: 'succeeded', progress: 1}, null),
        };
    }""")
    assert result["fromStart"] == pytest.approx(30)
    assert result["fromSeen"] == pytest.approx(4)
    assert result["fromService"] == 7
    assert result["serviceTooEarly"] is None
    assert result["unknown"] is None
    assert result["tooEarly"] is None  # under 2%: model loading would dominate the rate
    assert result["running"] == "Separating — 50% · about 2 min 5 s left"
    assert result["estimating"] == "Separating — 5% · estimating time left…"
    assert result["queued"] == "Queued — waiting for a worker"
    assert result["third"] == "Queued — position 3 in the queue"
    assert result["next"] == "Queued — next in line"
    assert result["done"] == {"percent": 100, "text": "Done — 100%"}
