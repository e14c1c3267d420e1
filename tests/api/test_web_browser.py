"""The web page in a real browser (headless Debian Chromium driven by Playwright) against
a real `demix up` with the tiny model and a tiny vocals RoFormer: uploads of one or several
files (a card per job), progress, stems that play in sync, mute and solo, downloads, recent
jobs, readable errors, presets (workflows) with each step's progress."""
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
from testkit.tiny_models import TINY_MODEL, TINY_VOCALS, write_tiny_repo, write_tiny_roformer
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
FORM_ERROR = "#form-error"  # the form's own error box; each job's card has its own


@pytest.fixture(scope="module")
def browser():
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(NO_CHROMIUM)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


VOICES_THEN_BAND = {
    "description": "Vocals by two models averaged, then the band from what they leave",
    "steps": [{"name": "voc", "input": "mix", "models": [TINY_VOCALS, TINY_MODEL], "ensemble": "avg_fft"},
              {"name": "band", "input": "voc/no_vocals", "models": [TINY_MODEL]}],
    "outputs": {"vocals": "voc/vocals", "instrumental": "voc/no_vocals", "drums": "band/drums",
                "bass": "band/bass", "other": "band/other"}}
"""The operator's preset the page runs: an ensemble step, then a step chained on its stem."""
SIX_STEMS = {"steps": [{"name": "six", "models": ["htdemucs_6s"]}]}
"""An operator's preset naming a model this deployment does not serve: listed, disabled."""


@pytest.fixture(scope="module")
def service_url(tmp_path_factory):
    """`demix up` serving the tiny HT-Demucs (the default) and a tiny one-source vocals
    RoFormer, with a presets file holding `voices_then_band` and the disabled `six_stems`;
    the shipped presets are made of the two models."""
    import yaml

    from demix.separation.weights.checkpoints import add_checkpoint

    root = tmp_path_factory.mktemp("web")
    repo = write_tiny_repo(root / "models")
    add_checkpoint(TINY_VOCALS, *write_tiny_roformer(root / "given", "mel_band_roformer", ["vocals", "other"],
                                                     target="vocals"), repo)
    presets = root / "workflows.yaml"
    presets.write_text(yaml.safe_dump({"voices_then_band": VOICES_THEN_BAND, "six_stems": SIX_STEMS},
                                      sort_keys=False))
    with demix_up(root, DEMIX_MODEL_REPO=str(repo), DEMIX_MODELS=f"{TINY_MODEL},{TINY_VOCALS}",
                  DEMIX_WORKFLOWS=str(presets)) as (url, _output, _marker):
        yield url


@contextlib.contextmanager
def watched_page(browser, base_url: str):
    """A fresh browser context's page; fails the test if the page throws or logs an error
    (a Content-Security-Policy violation, say) other than an HTTP error status it handles
    (a test that causes another one adds its start to `page.expected_console_errors`)."""
    context = browser.new_context(base_url=base_url, accept_downloads=True)
    page = context.new_page()
    problems: list = []
    page.expected_console_errors = ["Failed to load resource: the server responded with a status of"]
    page.on("pageerror", lambda error: problems.append(f"uncaught: {error}"))
    page.on("console", lambda message: message.type == "error"
            and not message.text.startswith(tuple(page.expected_console_errors))
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


SUBMISSIONS_ANSWERED = """() => !document.querySelector(
    '[data-role=job][data-state=waiting], [data-role=job][data-state=uploading]')"""
"""No card waits for its upload or its answer any more."""


def job_card(page, name: str):
    """The card of the job made from the file `name` (its title is the file's name)."""
    return page.locator("[data-role=job]").filter(
        has=page.locator("[data-role=job-title]", has_text=re.compile(f"^{re.escape(name)}$")))


def stem_state(scope) -> list[dict]:
    """Every stem <audio> under `scope` (a page, or one job's card)."""
    return scope.locator("audio[data-stem]").evaluate_all("""els => els.map(a => ({
        stem: a.dataset.stem, duration: a.duration, muted: a.muted, paused: a.paused,
        time: a.currentTime, ready: a.readyState}))""")


def no_error_shown(page) -> bool:
    """Neither the form's error box nor any job card's shows a message."""
    return page.locator("[data-role=error]:not([hidden])").count() == 0


def wait_for_stems(page, card, expected: set[str], timeout: float = JOB_TIMEOUT_MS) -> None:
    """Wait until the card's every stem <audio> knows its duration and every waveform is drawn."""
    page.wait_for_function(
        """([card, count]) => { const audios = [...card.querySelectorAll('audio[data-stem]')];
                      return audios.length === count && audios.every(a => a.readyState >= 1 && isFinite(a.duration)); }""",
        arg=[card.element_handle(timeout=timeout), len(expected)], timeout=timeout)
    page.wait_for_function(
        "card => [...card.querySelectorAll('.stem')].every(s => s.dataset.waveform)",
        arg=card.element_handle(), timeout=60_000)
    assert {state["stem"] for state in stem_state(card)} == expected


def separate_through_page(page, path: Path, stems: str, expected: set[str]):
    """Submit `path` with the form and wait for its stems (`wait_for_stems`); returns its card."""
    page.set_input_files("input[type=file][name=file]", str(path))
    page.select_option("select[name=stems]", stems)
    page.click("button[type=submit]")
    card = job_card(page, path.name)
    wait_for_stems(page, card, expected)
    return card


def play_and_measure_spread(page, card) -> list[float]:
    """Play the card's stems and return the spread of their positions, sampled 8 times."""
    card.locator("[data-action=play]").click()
    page.wait_for_function("""card => [...card.querySelectorAll('audio[data-stem]')]
                              .every(a => !a.paused && a.currentTime > 0.3)""", arg=card.element_handle())
    return card.evaluate("""async card => {
        const spreads = [];
        for (let i = 0; i < 8; i++) {
            const times = [...card.querySelectorAll('audio[data-stem]')].map(a => a.currentTime);
            spreads.push(Math.max(...times) - Math.min(...times));
            await new Promise(resolve => setTimeout(resolve, 100));
        }
        return spreads;
    }""")


def test_upload_progress_playback_and_zip(page, song, tmp_path):
    open_page(page)
    # Record every state of the job card's progress bar as the page shows it.
    page.evaluate("""() => {
        window.progressSeen = [];
        new MutationObserver(() => {
            const card = document.querySelector('[data-role=job]');
            if (!card) return;
            const bar = card.querySelector('[data-role=progressbar]');
            const text = card.querySelector('[data-role=status]').textContent;
            const last = window.progressSeen[window.progressSeen.length - 1];
            if (!last || last[1] !== text) window.progressSeen.push([Number(bar.getAttribute('aria-valuenow')), text]);
        }).observe(document.querySelector('[data-role=jobs]'),
                   {childList: true, characterData: true, subtree: true, attributes: true});
    }""")
    card = separate_through_page(page, song, "all", {"drums", "bass", "other", "vocals"})

    for state in stem_state(page):
        assert state["duration"] == pytest.approx(INPUT_SECONDS, abs=0.005), state
    assert page.locator("[data-role=job]").count() == 1
    assert card.locator("[data-role=status]").text_content() == "Done — 100%"
    assert card.locator("[data-role=progressbar]").get_attribute("aria-valuenow") == "100"
    seen = page.evaluate("window.progressSeen")
    assert any(text.startswith("Uploading song.wav") for _, text in seen), seen
    job_phase = [value for value, text in seen if text.startswith(("Queued", "Separating", "Done"))]
    assert job_phase and job_phase == sorted(job_phase) and job_phase[-1] == 100, seen
    assert no_error_shown(page)
    assert all(card.locator(".stem").evaluate_all("els => els.map(e => e.dataset.waveform === 'drawn')"))

    # One transport: every stem plays, together.
    spreads = play_and_measure_spread(page, card)
    assert max(spreads) < 0.15, spreads  # the mixer re-aligns past 40 ms; slack for a loaded machine
    card.locator("[data-action=play]").click()  # pause
    assert all(state["paused"] for state in stem_state(card))

    # Seeking moves every stem.
    card.locator("[data-role=seek]").evaluate("el => { el.value = '2.5'; el.dispatchEvent(new Event('input')); }")
    for state in stem_state(card):
        assert state["time"] == pytest.approx(2.5, abs=0.01), state

    # Each stem's own download link, and the zip with every stem.
    with page.expect_download() as download:
        card.locator(".stem:has(audio[data-stem=vocals]) [data-role=download]").click()
    assert download.value.suggested_filename.endswith("_vocals.wav")
    assert sf.info(download.value.path()).frames == INPUT_SECONDS * INPUT_RATE
    with page.expect_download() as download:
        card.locator("[data-role=zip]").click()
    archive = zipfile.ZipFile(download.value.path())
    assert sorted(archive.namelist()) == ["bass.wav", "drums.wav", "other.wav", "vocals.wav"]
    for name in archive.namelist():
        assert sf.info(io.BytesIO(archive.read(name))).frames == INPUT_SECONDS * INPUT_RATE



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
    card = separate_through_page(page, song, "drums", {"drums", "no_drums"})
    assert page.is_hidden("[data-role=api-key]")
    for state in stem_state(card):
        assert state["duration"] == pytest.approx(INPUT_SECONDS, abs=0.005), state
    with page.expect_download() as download:
        card.locator("[data-role=zip]").click()
    assert sorted(zipfile.ZipFile(download.value.path()).namelist()) == ["drums.wav", "no_drums.wav"]
    assert refused == []


def test_output_options_mute_solo_and_recent_jobs_on_a_phone(page, song):
    page.set_viewport_size({"width": 360, "height": 740})
    open_page(page)
    page.click("summary")  # "Output options"
    page.select_option("select[name=format]", "flac")
    page.select_option("select[name=samplerate]", "22050")
    card = separate_through_page(page, song, "vocals", {"vocals", "no_vocals"})
    assert page.evaluate("document.scrollingElement.scrollWidth") <= 360  # nothing sticks out sideways
    assert "out: FLAC pcm16, 22050 Hz" in card.locator("[data-role=job-meta]").text_content()
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
    # Opening it again shows the card it has, not a second one.
    page.click("[data-role=recent] li [data-action=open]")
    assert page.locator("[data-role=job]").count() == 1
    assert page.locator("[data-role=recent] [aria-current=true]").count() == 1

    # A job's address opens it.
    page.goto("about:blank")
    page.goto(f"/#job={job_id}")
    page.wait_for_function(two_stems_loaded, timeout=60_000)
    assert page.text_content("[data-role=job-title]") == "song.wav"
    assert page.get_attribute("[data-role=job]", "data-job-id") == job_id


@pytest.mark.parametrize("name, content, expected", [
    ("notes.txt", b"these are my lyrics, not audio\n", "its first bytes"),
    ("song.mp3", b"ID3\x04\x00\x00\x00\x00\x00\x00" + bytes(2000), "it starts with an ID3 tag, but no MP3 frame follows it"),
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
    card = job_card(page, name)
    error = card.locator("[data-role=error]:not([hidden])")
    error.wait_for()
    (response,) = responses
    assert response.status in (415, 422)
    body = response.json()["error"]
    assert error.text_content() == body["message"]  # the message itself, not JSON
    assert expected in body["message"] or expected == str(response.status)
    assert card.locator("[data-role=status]").text_content() == "Refused by the service"
    assert page.is_hidden(FORM_ERROR)  # the file's card says it, not the form
    assert page.locator("audio[data-stem]").count() == 0


def test_several_files_at_once_make_a_card_each(page, tmp_path):
    """Three files chosen at once, one of them not audio: a card each, in order. The two songs
    each get their own mixer whose stems last as long as their own input, playing one pauses
    the other; the bogus file's card shows the service's message while the others go on."""
    songs = {"short.wav": 3.0, "long.wav": 4.5}
    for name, seconds in songs.items():
        write_wav(tmp_path / name, INPUT_RATE, 2, seconds=seconds, seed=len(name))
    bogus = tmp_path / "cover.mp3"  # a picture, named like a song
    bogus.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(4000))
    open_page(page)
    responses: list = []
    page.on("response", lambda response: response.url.endswith("/v1/jobs")
            and response.request.method == "POST" and responses.append(response))
    page.set_input_files("input[type=file][name=file]",
                         [str(tmp_path / "short.wav"), str(bogus), str(tmp_path / "long.wav")])
    assert page.text_content("[data-role=file-name]").startswith("3 files (")
    page.click("button[type=submit]")  # all four stems
    assert page.locator("[data-role=job] [data-role=job-title]").all_text_contents() == \
        ["short.wav", "cover.mp3", "long.wav"]

    page.wait_for_function(SUBMISSIONS_ANSWERED, timeout=120_000)
    assert len(responses) == 3
    (refusal,) = [response for response in responses if not response.ok]
    assert refusal.status in (415, 422)
    bad = job_card(page, "cover.mp3")
    error = bad.locator("[data-role=error]:not([hidden])")
    error.wait_for()
    assert error.text_content() == refusal.json()["error"]["message"]
    assert bad.get_attribute("data-state") == "not-sent"
    keys = [response.request.headers["idempotency-key"] for response in responses]
    assert len(set(keys)) == 3  # one key per file

    cards = {name: job_card(page, name) for name in songs}
    assert [cards[name].get_attribute("data-job-id") for name in songs] == \
        [response.json()["id"] for response in responses if response.ok]
    for name, seconds in songs.items():
        wait_for_stems(page, cards[name], {"drums", "bass", "other", "vocals"})
        for state in stem_state(cards[name]):
            assert state["duration"] == pytest.approx(seconds, abs=0.005), (name, state)
        assert cards[name].locator("[data-role=status]").text_content() == "Done — 100%"
        assert cards[name].locator("[data-role=error]").is_hidden()
    assert error.is_visible()  # the others' success did not clear it
    assert page.is_hidden(FORM_ERROR)
    assert bad.locator("audio[data-stem]").count() == 0
    assert page.locator("[data-role=recent] li").count() == 2

    # Each card plays its own stems together; starting one pauses the other where it is.
    spreads = play_and_measure_spread(page, cards["short.wav"])
    assert max(spreads) < 0.15, spreads
    cards["short.wav"].locator("[data-role=seek]").evaluate(
        "el => { el.value = '0.5'; el.dispatchEvent(new Event('input')); }")  # far from its end
    spreads = play_and_measure_spread(page, cards["long.wav"])
    assert max(spreads) < 0.15, spreads
    for state in stem_state(cards["short.wav"]):
        assert state["paused"] and 0.5 <= state["time"] < songs["short.wav"], state  # not at its end
    assert cards["short.wav"].locator("[data-action=play]").get_attribute("aria-label") == "Play"
    cards["long.wav"].locator("[data-action=play]").click()  # pause
    assert all(state["paused"] for state in stem_state(page))

    # Each card's zip holds its own job's stems.
    for name, seconds in songs.items():
        with page.expect_download() as download:
            cards[name].locator("[data-role=zip]").click()
        archive = zipfile.ZipFile(download.value.path())
        assert sorted(archive.namelist()) == ["bass.wav", "drums.wav", "other.wav", "vocals.wav"]
        for member in archive.namelist():
            assert sf.info(io.BytesIO(archive.read(member))).frames == round(seconds * INPUT_RATE)

    screenshot = os.environ.get("WEB_PAGE_SCREENSHOT")  # not DEMIX_*: conftest clears those
    if screenshot:  # how docs/screenshot.png is made (docs/development.md)
        page.set_viewport_size({"width": 1100, "height": 900})
        page.evaluate("window.scrollTo(0, 0)")
        page.screenshot(path=screenshot, full_page=True)


STEP_STATUSES = """() => {
    window.stepsSeen = {};
    new MutationObserver(() => {
        for (const step of document.querySelectorAll('[data-role=step]')) {
            const seen = (window.stepsSeen[step.dataset.step] ??= []);
            if (seen[seen.length - 1] !== step.dataset.status) seen.push(step.dataset.status);
        }
    }).observe(document.querySelector('[data-role=jobs]'), {childList: true, subtree: true, attributes: true});
}"""
"""Record every status each step row of the page shows, in order (`window.stepsSeen`)."""


def test_a_preset_runs_its_steps_shown_one_by_one_and_its_stems_play(page, song):
    open_page(page)
    listed = {preset["name"]: preset for preset in page.request.get("/v1/workflows").json()["workflows"]}
    assert [name for name, preset in listed.items() if preset["enabled"]] == \
        ["best_vocals", "vocals_then_band", "voices_then_band"]

    # Every preset is offered; the one this service cannot run is shown, not selectable, saying why.
    offered = page.eval_on_selector_all("select[name=preset] option", """options => options.map(o =>
        ({value: o.value, disabled: o.disabled, title: o.title}))""")
    assert [option["value"] for option in offered] == ["", *listed]
    six = next(option for option in offered if option["value"] == "six_stems")
    reason = listed["six_stems"]["disabled_reason"]
    assert six["disabled"] and six["title"] == reason and "htdemucs_6s" in reason
    note = page.locator("[data-role=presets-unavailable] li[data-preset=six_stems]")
    assert note.is_visible() and reason in " ".join(note.text_content().split())
    assert not any(option["disabled"] for option in offered if option["value"] != "six_stems")

    # Choosing a preset sets aside the model, the stems, the rate and the channels.
    page.click("summary")  # "Output options"
    page.select_option("select[name=format]", "flac")
    page.focus("select[name=preset]")
    page.select_option("select[name=preset]", "voices_then_band")
    hint = page.text_content("[data-role=preset-hint]")
    assert f'{VOICES_THEN_BAND["description"]}. Steps: ' in hint and "voc: tiny_vocals + tiny (avg_fft)" in hint, hint
    assert "Stems: vocals, instrumental, drums, bass, other." in hint
    for name in ("model", "stems", "samplerate", "channels"):
        assert page.is_disabled(f"select[name={name}]"), name
    assert page.is_visible("[data-role=preset-output-note]")

    page.evaluate(STEP_STATUSES)
    page.set_input_files("input[type=file][name=file]", str(song))
    with page.expect_response(lambda response: response.url.endswith("/v1/jobs")
                              and response.request.method == "POST") as answered:
        page.click("button[type=submit]")
    # Accepted (a preset job naming a model or stems would be refused), with the output options.
    assert answered.value.status == 202, answered.value.text()
    job = answered.value.json()
    assert (job["model"], job["output"]["format"]) == ("workflow", "flac")
    assert [step["name"] for step in job["workflow"]["steps"]] == ["voc", "band"]

    card = job_card(page, song.name)
    steps = card.locator("[data-role=step]")
    page.wait_for_function("""card => { const steps = [...card.querySelectorAll('[data-role=step]')];
                              return steps.length === 2 && steps.every(s => s.dataset.status === 'succeeded'); }""",
                           arg=card.element_handle(), timeout=JOB_TIMEOUT_MS)
    assert [step.get_attribute("data-step") for step in steps.all()] == ["voc", "band"]
    seen = page.evaluate("window.stepsSeen")
    order = ["waiting", "queued", "running", "succeeded"]
    for name, statuses in seen.items():
        assert statuses == sorted(statuses, key=order.index) and statuses[-1] == "succeeded", seen
    assert seen["band"][0] == "waiting", seen  # it waits for the step it is chained on
    voc = card.locator("[data-role=step][data-step=voc]")
    assert voc.locator("[data-role=step-models]").text_content() == "tiny_vocals + tiny · avg_fft ensemble"
    assert card.locator("[data-step=band] [data-role=step-models]").text_content() == "tiny · from voc/no_vocals"
    runs = voc.locator(".run").evaluate_all("els => els.map(e => [e.dataset.model, e.dataset.status, e.dataset.cached])")
    assert runs == [["tiny_vocals", "succeeded", "false"], ["tiny", "succeeded", "false"]]
    assert voc.locator(".run").first.is_visible()  # an ensemble's runs are shown; a single run is its step
    for bar in card.locator("[data-role=step-progressbar]").all():
        assert bar.get_attribute("aria-valuenow") == "100"

    # The result plays and downloads as any job's.
    expected = {"vocals", "instrumental", "drums", "bass", "other"}
    wait_for_stems(page, card, expected)
    assert card.locator("[data-role=status]").text_content() == "Done — 100%"
    meta = card.locator("[data-role=job-meta]").text_content()
    assert "preset voices_then_band: voc → band" in meta and "out: FLAC" in meta, meta
    for state in stem_state(card):
        assert state["duration"] == pytest.approx(INPUT_SECONDS, abs=0.005), state
    spreads = play_and_measure_spread(page, card)  # every stem playing, past 0.3 s
    assert max(spreads) < 0.15, spreads
    card.locator("[data-action=play]").click()  # pause
    with page.expect_download() as download:
        card.locator("[data-role=zip]").click()
    assert sorted(zipfile.ZipFile(download.value.path()).namelist()) == sorted(f"{name}.flac" for name in expected)
    assert "preset voices_then_band" in page.text_content("[data-role=recent] li")
    assert no_error_shown(page)

    # Back to a model: its controls come back.
    page.select_option("select[name=preset]", "")
    for name in ("model", "stems", "samplerate", "channels"):
        assert page.is_enabled(f"select[name={name}]"), name
    assert page.is_hidden("[data-role=preset-output-note]")


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
    card = job_card(idle_page, "waiting.wav")
    card.locator("[data-role=status]", has_text=re.compile("^Queued — ")).wait_for()
    assert card.locator("[data-role=progressbar]").get_attribute("aria-valuenow") == "0"
    assert card.get_attribute("data-state") == "queued"
    assert no_error_shown(idle_page)
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


DROP_FILES = """(zone, files) => {
    const dropped = new DataTransfer();
    for (const [name, type, bytes] of files) dropped.items.add(new File([new Uint8Array(bytes)], name, {type}));
    zone.dispatchEvent(new DragEvent('drop', {dataTransfer: dropped, bubbles: true, cancelable: true}));
}"""


def drop_files(page, files: list[tuple[str, str, bytes]]) -> None:
    """Drop files, given as (name, media type, content), on the page's drop zone."""
    page.eval_on_selector("[data-role=dropzone]", DROP_FILES,
                          [[name, media_type, list(content)] for name, media_type, content in files])


def test_a_dropped_file_is_chosen(idle_page):
    open_page(idle_page)
    drop_files(idle_page, [("dropped.wav", "audio/wav", bytes(2048))])
    assert idle_page.eval_on_selector("input[type=file][name=file]", "input => input.files[0].name") == "dropped.wav"
    assert idle_page.text_content("[data-role=file-name]") == "dropped.wav (2 KiB)"


def test_the_picker_takes_several_audio_and_video_files(idle_page):
    open_page(idle_page)
    picker = idle_page.locator("input[type=file][name=file]")
    assert picker.get_attribute("multiple") is not None
    accepted = picker.get_attribute("accept").split(",")
    for extension in (".wav", ".flac", ".mp3", ".ogg", ".opus", ".aiff", ".aifc", ".m4a", ".mp4", ".webm",
                      ".mka", ".mkv"):
        assert extension in accepted, extension
    assert idle_page.text_content("[data-role=file-name]") == "Drop audio files here"


def test_dropped_files_make_a_job_each(idle_page, tmp_path):
    """Two files dropped at once: two submissions, each with its own Idempotency-Key, and a
    card each, in the order they were dropped; sending them again makes no new jobs."""
    first = write_wav(tmp_path / "first.wav", 22050, 1, seconds=0.5).read_bytes()
    second = write_wav(tmp_path / "second.wav", 22050, 2, seconds=0.7).read_bytes()
    open_page(idle_page)
    submitted = job_requests(idle_page)
    drop_files(idle_page, [("first.wav", "audio/wav", first), ("second.wav", "audio/wav", second)])
    assert idle_page.eval_on_selector("input[type=file][name=file]", "i => [...i.files].map(f => f.name)") == \
        ["first.wav", "second.wav"]
    assert idle_page.text_content("[data-role=file-name]").startswith("2 files (")
    idle_page.click("button[type=submit]")
    queued = idle_page.locator("[data-role=job][data-state=queued]")
    idle_page.wait_for_function("() => document.querySelectorAll('[data-role=job][data-state=queued]').length === 2")
    assert queued.locator("[data-role=job-title]").all_text_contents() == ["first.wav", "second.wav"]
    assert [card.get_attribute("data-job-id") for card in queued.all()] == \
        [request.response().json()["id"] for request in submitted]
    assert job_card(idle_page, "first.wav").locator("[data-role=job-meta]").text_content().startswith("0.50 s")
    assert job_card(idle_page, "second.wav").locator("[data-role=job-meta]").text_content().startswith("0.70 s")
    keys = [request.headers["idempotency-key"] for request in submitted]
    assert len(set(keys)) == 2

    idle_page.click("button[type=submit]")  # the same files and options again
    idle_page.wait_for_function(SUBMISSIONS_ANSWERED)
    assert len(submitted) == 4
    assert [request.headers["idempotency-key"] for request in submitted[2:]] == keys
    assert idle_page.locator("[data-role=job]").count() == 2  # the jobs they already have
    assert idle_page.locator("[data-role=recent] li").count() == 2


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
    card = job_card(idle_page, "fails.wav")
    error = card.locator("[data-role=error]:not([hidden])")
    error.wait_for()
    assert error.text_content() == f"The separation failed: {failure['message']}"
    assert card.locator("[data-role=status]").text_content() == "Failed"
    assert idle_page.text_content("[data-role=recent] .badge") == "failed"
    assert idle_page.is_hidden(FORM_ERROR)


def test_a_workflow_run_from_the_cache_says_so(idle_page, tmp_path):
    """A workflow job's steps as the service reports them (simulated here over a queued job:
    the cache is not the page's to test): a run that came from the cache says so, even the
    lone run of a step, whose row is otherwise its step's own."""
    path = write_wav(tmp_path / "cached.wav", 22050, 1, seconds=0.5)

    def run(model: str, cached: bool) -> dict:
        return {"model": model, "status": "succeeded", "progress": 1.0, "cached": cached, "attempts": int(not cached)}

    steps = [{"name": "voc", "input": "mix", "models": ["a", "b"], "sources": ["vocals"], "ensemble": "max_fft",
              "weights": [2, 1], "status": "succeeded", "progress": 1.0, "runs": [run("a", True), run("b", False)]},
             {"name": "band", "input": "voc/no_vocals", "models": ["c"], "sources": ["drums"], "ensemble": None,
              "weights": None, "status": "succeeded", "progress": 1.0, "runs": [run("c", True)]},
             {"name": "more", "input": "mix", "models": ["d"], "sources": ["drums"], "ensemble": None,
              "weights": None, "status": "running", "progress": 0.25,
              "runs": [{**run("d", False), "status": "running", "progress": 0.25}]}]
    idle_page.route(re.compile(r"/v1/jobs/[0-9a-f]{32}$"), lambda route: route.continue_()
                    if route.request.method != "GET" else route.fulfill(json={
                        **route.fetch().json(), "status": "running", "model": "workflow", "progress": 0.8,
                        "workflow": {"steps": steps, "outputs": {}}}))
    open_page(idle_page)
    idle_page.set_input_files("input[type=file][name=file]", str(path))
    idle_page.click("button[type=submit]")
    card = job_card(idle_page, "cached.wav")
    card.locator("[data-role=step][data-step=more][data-status=running]").wait_for()
    assert card.locator("[data-role=step]").evaluate_all("els => els.map(e => e.dataset.step)") == \
        ["voc", "band", "more"]
    voc = card.locator("[data-step=voc]")
    assert voc.locator("[data-role=step-models]").text_content() == "a + b · max_fft ensemble (weights 2, 1)"
    assert voc.locator(".run-status").all_text_contents() == ["done · from the cache", "done · 100%"]
    band_run = card.locator("[data-step=band] .run")
    assert band_run.is_visible() and band_run.text_content() == "cdone · from the cache"
    assert card.locator("[data-step=more] .run").is_hidden()  # a lone run not from the cache: its step says it
    more_bar = card.locator("[data-step=more] [data-role=step-progressbar]")
    assert (more_bar.get_attribute("aria-valuenow"), more_bar.get_attribute("aria-valuetext")) == ("25", "running, 25%")
    assert card.locator("[data-step=more] [data-role=step-status]").text_content() == "running"
    assert "workflow: voc → band → more" in card.locator("[data-role=job-meta]").text_content()


def test_the_same_submission_again_reuses_its_idempotency_key(idle_page, tmp_path):
    path = write_wav(tmp_path / "twice.wav", 22050, 1, seconds=0.5)
    open_page(idle_page)
    submitted = job_requests(idle_page)

    def submit() -> None:
        count = len(submitted)
        idle_page.click("button[type=submit]")
        idle_page.wait_for_function("() => [...document.querySelectorAll('[data-role=job]')]"
                                    ".every(card => card.dataset.state === 'queued')")
        assert len(submitted) == count + 1

    idle_page.set_input_files("input[type=file][name=file]", str(path))
    submit()
    submit()
    assert idle_page.locator("[data-role=job]").count() == 1  # the same job: its card, once
    idle_page.select_option("select[name=stems]", "bass")
    submit()
    first, again, changed = (request.headers["idempotency-key"] for request in submitted)
    assert first == again != changed
    assert idle_page.locator("[data-role=job]").count() == 2


def test_an_upload_cut_off_can_be_tried_again_with_its_key(idle_page, tmp_path):
    """The first try's connection is cut (simulated): its card says so and offers to try
    again, which sends the same Idempotency-Key and then follows the job."""
    path = write_wav(tmp_path / "flaky.wav", 22050, 1, seconds=0.5)
    tries: list = []

    def cut_the_first(route):
        tries.append(route.request.headers["idempotency-key"])
        if len(tries) == 1:
            route.abort("connectionreset")
        else:
            route.continue_()

    idle_page.expected_console_errors.append("Failed to load resource: net::ERR_CONNECTION_RESET")
    idle_page.route("**/v1/jobs", lambda route: cut_the_first(route) if route.request.method == "POST"
                    else route.continue_())
    open_page(idle_page)
    idle_page.set_input_files("input[type=file][name=file]", str(path))
    idle_page.click("button[type=submit]")
    card = job_card(idle_page, "flaky.wav")
    card.locator("[data-action=retry]").wait_for()
    assert card.locator("[data-role=error]").text_content().startswith("The upload was cut off.")
    assert card.get_attribute("data-state") == "not-sent"
    card.locator("[data-action=retry]").click()
    card.locator("[data-role=status]", has_text=re.compile("^Queued — ")).wait_for()
    assert card.locator("[data-role=error]").is_hidden()
    assert card.locator("[data-action=retry]").is_hidden()
    assert len(tries) == 2 and tries[0] == tries[1]
    assert idle_page.locator("[data-role=job]").count() == 1


def test_a_file_over_the_limit_is_refused_before_it_is_sent(idle_page, tmp_path):
    """Said as soon as it is chosen; submitting sends the other files, and the big one's
    card says why it was not sent."""
    path = tmp_path / "big.wav"
    path.write_bytes(bytes(int(1.5 * 1024 * 1024)))
    small = write_wav(tmp_path / "small.wav", 22050, 1, seconds=0.5)
    message = "big.wav is 1.5 MiB; this service accepts files up to 1 MiB."
    open_page(idle_page)
    submitted = job_requests(idle_page)
    idle_page.set_input_files("input[type=file][name=file]", str(path))
    assert idle_page.text_content(FORM_ERROR) == message
    idle_page.click("button[type=submit]")
    big = job_card(idle_page, "big.wav")
    assert big.locator("[data-role=error]").text_content() == message
    assert big.get_attribute("data-state") == "not-sent"
    assert idle_page.is_hidden(FORM_ERROR)
    assert submitted == []

    idle_page.set_input_files("input[type=file][name=file]", [str(path), str(small)])
    assert idle_page.text_content(FORM_ERROR) == message
    idle_page.click("button[type=submit]")
    idle_page.wait_for_function(SUBMISSIONS_ANSWERED)
    small_card = job_card(idle_page, "small.wav")
    assert small_card.get_attribute("data-state") == "queued"
    assert [request.response().json()["id"] for request in submitted] == [small_card.get_attribute("data-job-id")]
    assert job_card(idle_page, "big.wav").count() == 2  # the first try's card and this one's
    for card in job_card(idle_page, "big.wav").all():
        assert card.locator("[data-role=error]").text_content() == message


def test_the_services_413_is_shown_when_the_page_does_not_know_the_limit(idle_page, tmp_path):
    """A limit the page does not know of (a proxy's, say): the service's 413 message shows."""
    path = write_wav(tmp_path / "long.wav", 44100, 2, seconds=6.0)  # ~1 MiB of audio over the limit
    idle_page.route("**/", lambda route: route.fulfill(
        response=route.fetch(), body=route.fetch().text().replace('data-max-upload-bytes="1048576"',
                                                                  'data-max-upload-bytes=""')))
    open_page(idle_page)
    idle_page.set_input_files("input[type=file][name=file]", str(path))
    idle_page.click("button[type=submit]")
    error = job_card(idle_page, "long.wav").locator("[data-role=error]:not([hidden])")
    error.wait_for()
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
    job_card(idle_page, "keyed.wav").locator("[data-role=status]", has_text=re.compile("^Queued — ")).wait_for()
    assert authorizations[0] is None and "Bearer wrong" in authorizations and authorizations[-1] == "Bearer sesame"
    assert idle_page.evaluate("localStorage.getItem('demix.apiKey')") == "sesame"
    # Every try of this one submission carried the same Idempotency-Key: at most one job.
    assert len(idempotency_keys) == 3 and len(set(idempotency_keys)) == 1
    assert re.fullmatch(r"[0-9a-f]{32}", idempotency_keys[0])
    assert no_error_shown(idle_page)


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
    card = job_card(idle_page, "cancel.wav")
    card.locator("[data-action=cancel]").click()
    card.locator("[data-role=status]", has_text=re.compile("^Cancelled$")).wait_for()
    assert card.locator("[data-action=cancel]").is_hidden()
    job_id = idle_page.eval_on_selector("[data-role=recent] li", "li => li.dataset.jobId")
    assert card.get_attribute("data-job-id") == job_id
    card.locator("[data-action=delete]").click()
    assert card.locator("[data-action=delete]").text_content() == "Really delete?"
    card.locator("[data-action=delete]").click()
    card.wait_for(state="detached")
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


@pytest.fixture
def two_model_page(browser, redis_server, settings, tmp_path):
    """The page of an API serving the tiny model and the 6-stem HT-Demucs, no worker for either."""
    import dataclasses

    from demix.api import create_app
    from tests.support.environment import UNCONSUMED_QUEUE
    from tests.support.live import LiveServer

    two = dataclasses.replace(settings, queue=UNCONSUMED_QUEUE, models=f"{settings.model},htdemucs_6s",
                              data_dir=tmp_path / "data")
    with LiveServer(create_app({"SETTINGS": two})) as server, watched_page(browser, server.url) as page:
        yield page


def test_the_stems_offered_follow_the_chosen_model_and_a_job_waits_for_its_worker(two_model_page, tmp_path):
    page = two_model_page
    open_page(page)
    stems = lambda: page.eval_on_selector_all("select[name=stems] option", "options => options.map(o => o.value)")
    assert stems() == ["all", "drums", "bass", "other", "vocals"]
    page.select_option("select[name=model]", "htdemucs_6s")
    assert stems() == ["all", "drums", "bass", "other", "vocals", "guitar", "piano"]
    page.select_option("select[name=stems]", "guitar")
    page.set_input_files("input[type=file][name=file]", str(write_wav(tmp_path / "g.wav", 22050, 1, seconds=0.5)))
    with page.expect_response(lambda response: response.url.endswith("/v1/jobs")) as submitted:
        page.click("button[type=submit]")
    job = submitted.value.json()
    assert (job["model"], job["stems"]) == ("htdemucs_6s", "guitar")
    page.wait_for_function("() => document.querySelector('[data-role=status]').textContent.includes("
                           "'no worker serves model htdemucs_6s yet')")
