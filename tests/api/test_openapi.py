"""`/openapi.json` and `/docs`: a valid OpenAPI 3.1 document that describes exactly the
app's routes, the job JSON's fields, the parser's form fields and every error code."""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import requests
from openapi_spec_validator import validate

from demix.api import create_app
from demix.api.openapi import OPERATIONS, UNDESCRIBED_ENDPOINTS, openapi_path
from demix.intake.job_request import FILE_FIELD, FORM_FIELDS, URL_FIELD
from testkit.synthetic_audio import wav_bytes

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def spec(idle_server) -> dict:
    return requests.get(f"{idle_server.url}/openapi.json", timeout=10).json()


def test_the_document_is_valid_openapi_3_1(spec):
    assert spec["openapi"].startswith("3.1")
    validate(spec)


def test_the_validator_would_catch_a_broken_document(spec):
    broken = {**spec, "paths": {**spec["paths"], "/v1/jobs": {"post": {"responses": {"200": {}}}}}}
    with pytest.raises(Exception):
        validate(broken)


def test_every_route_is_described_and_every_description_is_a_route(idle_server, spec):
    """A new endpoint without an `Operation` in `demix/api/openapi.py` fails here."""
    app = create_app({"SETTINGS": idle_server.settings})
    routes = {(openapi_path(rule.rule), method.lower())
              for rule in app.url_map.iter_rules() if rule.endpoint not in UNDESCRIBED_ENDPOINTS
              for method in rule.methods - {"HEAD", "OPTIONS"}}
    described = {(path, method) for path, item in spec["paths"].items() for method in item}
    assert routes == described
    assert len(OPERATIONS) == len(described)
    app.extensions["demix"].jobs.redis.close()


def test_the_form_is_the_parsers_fields(spec):
    form = spec["components"]["schemas"]["JobRequest"]
    assert list(form["properties"]) == [FILE_FIELD, URL_FIELD] + [field.name for field in FORM_FIELDS]
    for field in FORM_FIELDS:
        if field.choices:
            assert form["properties"][field.name]["enum"] == list(field.choices)


def test_the_job_schema_has_exactly_the_fields_of_the_job_json(idle_server, spec, tmp_path):
    job = requests.post(f"{idle_server.url}/v1/jobs", files={"file": ("a.wav", wav_bytes(tmp_path))},
                        timeout=30).json()
    schema = spec["components"]["schemas"]["Job"]
    assert set(job) == set(schema["required"])
    # The links once succeeded; `workflow` for a workflow job (its schema: tests/workflows/).
    assert set(schema["properties"]) == set(job) | {"result_url", "zip_url", "workflow"}
    assert schema["additionalProperties"] is False


def _codes_in_source() -> set[str]:
    """Every `code=` / `code = ` string literal of the service's errors."""
    codes = set()
    for path in [*ROOT.glob("api/*.py"), *ROOT.glob("shared/*.py"), *ROOT.glob("worker/*.py")]:
        codes |= set(re.findall(r'\bcode\s*=\s*"([a-z_]+)"', path.read_text()))
    # Base classes whose instances are always raised with a specific `code=`; and the job
    # state machine's refusals, which the API never answers with (cancel turns them into
    # `job_finished`, delete needs none).
    return codes - {"error", "invalid_audio", "illegal_transition", "stale_attempt"}


def test_every_error_code_in_the_code_is_in_the_spec(spec):
    described = set()
    for response in spec["components"]["responses"].values():
        schema = response["content"]["application/json"]["schema"]
        described |= set(schema["allOf"][1]["properties"]["error"]["properties"]["code"]["enum"])
    job_error = spec["components"]["schemas"]["Job"]["properties"]["error"]["oneOf"][1]
    described |= set(re.findall(r"[a-z_]+", job_error["properties"]["code"]["description"].split(":", 1)[1]))
    missing = _codes_in_source() - described
    assert not missing, f"error codes raised in the code but not in the spec: {missing}"


def test_api_key_parts_appear_only_when_keys_are_configured(idle_server, spec):
    assert "securitySchemes" not in spec["components"]
    assert "401" not in spec["paths"]["/v1/jobs/{job_id}"]["get"]["responses"]
    settings = dataclasses.replace(idle_server.settings, api_keys="k1", max_active_jobs_per_key=3)
    app = create_app({"SETTINGS": settings})
    keyed = app.test_client().get("/openapi.json").get_json()
    validate(keyed)
    assert keyed["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"
    submit = keyed["paths"]["/v1/jobs"]["post"]
    assert submit["security"] == [{"bearerAuth": []}] and {"401", "429"} <= set(submit["responses"])
    assert keyed["paths"]["/healthz"]["get"]["security"] == []
    app.extensions["demix"].jobs.redis.close()


def test_docs_render_the_spec_with_assets_served_locally(idle_server):
    page = requests.get(f"{idle_server.url}/docs", timeout=10)
    assert page.status_code == 200 and page.headers["Content-Type"].startswith("text/html")
    assert "openapi.json" in page.text
    sources = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert sources and not [s for s in sources if "//" in s]  # nothing from another host
    for source in sources:
        asset = requests.get(f"{idle_server.url}/{source}", timeout=30)
        assert asset.status_code == 200 and len(asset.content) > 1000, source
    bundle = requests.get(f"{idle_server.url}/docs/swagger-ui-bundle.js", timeout=30).text
    version = re.search(r"swagger-ui-5\.\d+\.\d+", str(Path(__import__("swagger_ui_bundle").swagger_ui_path)))
    assert version and "SwaggerUIBundle" in bundle  # Swagger UI 5: renders OpenAPI 3.1
