"""`GET /`: the web page is served by the app itself, carries the hooks automated
clients rely on, offers the presets beside the models, and everything it references is
served too (no CDN)."""
from __future__ import annotations

import dataclasses
import json
import re
from html.parser import HTMLParser
from urllib.parse import urljoin, urlparse

import pytest

from demix.api import create_app
from demix.api.web import describe_steps
from demix.audio.output_formats import FORMATS
from demix.stems import STEM_CHOICES
from testkit.tiny_models import TINY_MODEL


class _Page(HTMLParser):
    """Collects the elements of an HTML page as (tag, attributes) pairs."""

    def __init__(self) -> None:
        super().__init__()
        self.elements: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        self.elements.append((tag, dict(attrs)))

    def find(self, tag: str, **attrs: str) -> list[dict]:
        return [found for name, found in self.elements
                if name == tag and all(found.get(k.rstrip("_")) == v for k, v in attrs.items())]


@pytest.fixture
def client(settings):
    return create_app({"SETTINGS": settings}).test_client()


def parsed_page(client) -> _Page:
    response = client.get("/")
    assert response.status_code == 200
    assert response.mimetype == "text/html"
    parsed = _Page()
    parsed.feed(response.get_data(as_text=True))
    return parsed


@pytest.fixture
def page(client) -> _Page:
    return parsed_page(client)


def test_page_has_the_stable_test_hooks(page):
    assert len(page.find("input", type="file", name="file")) == 1
    assert len(page.find("button", type="submit")) == 1
    assert page.find("a", **{"data-role": "zip"})
    assert [tag for tag, attrs in page.elements if attrs.get("data-role") == "error"]
    # Each finished stem gets its own <audio data-stem=NAME> from this template.
    assert page.find("audio")


def test_the_model_choice_lists_the_served_models_with_their_stems(page, settings):
    (model,) = page.find("option", value=settings.default_model)
    assert model["data-stems"] == ",".join(STEM_CHOICES)  # not loaded by a worker yet: the 4-stem default
    assert page.find("select", name="model") and page.find("label", for_="model")


def test_the_file_input_takes_several_files_of_the_accepted_formats(page):
    (picker,) = page.find("input", type="file", name="file")
    assert "multiple" in picker
    accepted = set(picker["accept"].split(","))
    for extension in (".wav", ".flac", ".mp3", ".ogg", ".opus", ".aif", ".aiff", ".aifc", ".m4a", ".mp4",
                      ".webm", ".mka", ".mkv"):
        assert extension in accepted, extension
    assert {"audio/mpeg", "audio/flac", "audio/ogg", "audio/mp4", "video/mp4", "video/webm"} <= accepted


def test_each_job_card_comes_from_a_template_with_its_own_hooks(client):
    """A card per job: the roles and actions scripts and tests rely on sit inside the
    job template, once each, so they can be found within one job's card."""
    html = client.get("/").get_data(as_text=True)
    template = re.search(r'<template id="job-template">(.*?)</template>', html, re.S).group(1)
    card = _Page()
    card.feed(template)
    assert card.elements[0][1]["data-role"] == "job"
    for role in ("job-title", "job-meta", "progressbar", "status", "error", "mixer", "stems", "seek", "zip"):
        assert len([tag for tag, attrs in card.elements if attrs.get("data-role") == role]) == 1, role
    for action in ("cancel", "delete", "close", "play"):
        assert len(card.find("button", **{"data-action": action})) == 1, action
    assert not [attrs for _, attrs in card.elements if "id" in attrs]  # ids would repeat across cards


def test_stem_and_output_choices_come_from_the_service(page):
    (stems,) = page.find("select", name="stems")
    options = [attrs["value"] for tag, attrs in page.elements if tag == "option"]
    first = options.index("all")  # after the model choice
    assert options[first:first + len(STEM_CHOICES)] == list(STEM_CHOICES)
    assert stems["id"] == "stems"
    for field in ("format", "sample_format", "samplerate", "bitrate", "clip", "channels"):
        assert page.find("select", name=field), field
        assert page.find("label", for_=field), f"no label for {field}"
    assert all(page.find("option", value=fmt) for fmt in FORMATS)


def test_every_form_control_has_a_label(page):
    labelled = {attrs["for"] for tag, attrs in page.elements if tag == "label" and "for" in attrs}
    for tag, attrs in page.elements:
        if tag in ("select", "input") and attrs.get("type") not in ("file", "range"):
            assert attrs.get("id") in labelled, attrs
        if tag == "input" and attrs.get("type") == "range":
            assert attrs.get("aria-label"), attrs


def test_page_assets_resolve_locally(client, page):
    """Scripts, stylesheets, icons, the modules they import and the files CSS points at:
    every one answers 200 from this app."""
    pending = [attrs.get("src") or attrs.get("href") for tag, attrs in page.elements
               if tag in ("script", "link", "img") and (attrs.get("src") or attrs.get("href"))]
    seen: set[str] = set()
    base = "http://localhost/"
    while pending:
        url = urljoin(base, pending.pop())
        if url in seen:
            continue
        seen.add(url)
        assert urlparse(url).netloc == "localhost", f"page references another host: {url}"
        with client.get(urlparse(url).path) as response:
            assert response.status_code == 200, url
            textual = response.mimetype.startswith(("text/", "application/javascript"))
            text = response.get_data(as_text=True) if textual else ""
        references = re.findall(r"""^\s*import\s[^'"]*['"]([^'"]+)['"]""", text, re.M)
        references += re.findall(r"""url\(["']?([^"')]+)["']?\)""", text)
        pending += [urljoin(url, ref) for ref in references if not ref.startswith("data:")]
    assert any(url.endswith("/app.js") for url in seen)
    assert any(url.endswith("/mixer.js") for url in seen)  # found through app.js' imports
    assert any(url.endswith(".css") for url in seen)


def test_page_forbids_other_origins(client):
    policy = client.get("/").headers["Content-Security-Policy"]
    assert "default-src 'self'" in policy


BAND = {"steps": [{"name": "band", "models": [TINY_MODEL]}], "outputs": {"drums": "band/drums", "rest": "band/no_drums"}}


def test_the_presets_are_offered_beside_the_models_the_disabled_ones_saying_why(settings, tmp_path):
    """The session serves the tiny model alone: the shipped presets cannot run (disabled, with
    their reason as the option's title and in a note), the operator's `band` can."""
    from demix.workflows.presets import add_preset

    with_file = dataclasses.replace(settings, workflows=str(tmp_path / "workflows.yaml"))
    add_preset(with_file, "band", json.dumps(BAND), "the tiny model's band")
    client = create_app({"SETTINGS": with_file}).test_client()
    page = parsed_page(client)
    html = client.get("/").get_data(as_text=True)

    (select,) = page.find("select", name="preset")
    assert page.find("label", for_="preset") and select["aria-describedby"] == "preset-hint presets-unavailable"
    options = [attrs for tag, attrs in page.elements if tag == "option" and "data-description" in attrs]
    assert [option["value"] for option in options] == ["", "best_vocals", "vocals_then_band", "band"]
    (band,) = page.find("option", value="band")
    assert "disabled" not in band
    assert (band["data-description"], band["data-steps"], band["data-outputs"]) == \
        ("the tiny model's band", f"band: {TINY_MODEL}", "drums, rest")
    for name in ("best_vocals", "vocals_then_band"):
        (option,) = page.find("option", value=name)
        assert "disabled" in option and option["title"], name
        assert len(page.find("li", **{"data-preset": name})) == 1, name
    best_reason = page.find("option", value="best_vocals")[0]["title"]
    assert "two or more served models with a vocals source" in best_reason
    assert "is not available here:" in html and "two or more served models with a vocals source" in html


def test_a_presets_steps_are_described_in_a_line():
    chain = {"steps": [{"name": "voc", "input": "mix", "models": ["a", "b"], "ensemble": "avg_fft"},
                       {"name": "band", "input": "voc/no_vocals", "models": ["c"]},
                       {"name": "more", "models": ["d", "e"]}]}
    assert describe_steps(chain) == "voc: a + b (avg_fft) → band: c (from voc/no_vocals) → more: d + e (avg_wave)"
    assert describe_steps(None) == ""
