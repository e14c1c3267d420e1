"""`/openapi.json` and `/docs`: the API's description, and Swagger UI rendering it.

Swagger UI's files come from the `swagger-ui-bundle-v2` wheel and are served by the app
itself, so the page works with no internet access.
"""
from __future__ import annotations

import functools
from pathlib import Path

from flask import Blueprint, current_app, send_from_directory

from demix.api.openapi import build_spec

bp = Blueprint("docs", __name__)

DOCS_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <title>demix API</title>
  <link rel="stylesheet" href="docs/swagger-ui.css">
</head>
<body>
  <div id="swagger-ui"></div>
  <script src="docs/swagger-ui-bundle.js"></script>
  <script>
    window.ui = SwaggerUIBundle({url: "openapi.json", dom_id: "#swagger-ui", deepLinking: true});
  </script>
</body>
</html>
"""


@functools.lru_cache(maxsize=1)
def swagger_ui_dir() -> Path:
    """The folder of Swagger UI's distribution files inside the installed wheel."""
    import swagger_ui_bundle

    return Path(swagger_ui_bundle.swagger_ui_path)


@bp.get("/openapi.json")
def openapi_json():
    services = current_app.extensions["demix"]
    return build_spec(current_app.url_map, services.settings, keys_required=bool(services.api_keys))


@bp.get("/docs")
def docs_page():
    return DOCS_PAGE, 200, {"Content-Type": "text/html; charset=utf-8"}


@bp.get("/docs/<path:filename>")
def docs_asset(filename: str):
    return send_from_directory(swagger_ui_dir(), filename)
