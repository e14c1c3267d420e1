from __future__ import annotations

from pathlib import Path

import pytest

from demix.config import Settings


def test_settings_come_from_demix_variables_with_defaults():
    settings = Settings.from_env({"DEMIX_PORT": "9001", "DEMIX_DATA_DIR": "~/stems", "DEMIX_OVERLAP": "0.5"})
    assert settings.port == 9001 and settings.overlap == 0.5
    assert settings.data_dir == Path("~/stems").expanduser()
    assert settings.host == "127.0.0.1" and settings.model == "htdemucs" and settings.max_upload_mb == 500
    assert settings.max_upload_bytes == 500 * 1024 * 1024


def test_empty_redis_url_means_the_local_default():
    assert Settings.from_env({}).effective_redis_url == "redis://127.0.0.1:6379/0"
    assert Settings.from_env({"DEMIX_REDIS_URL": "redis://h:1/2"}).effective_redis_url == "redis://h:1/2"


def test_a_malformed_value_names_the_variable():
    with pytest.raises(ValueError, match="DEMIX_PORT='eighty'"):
        Settings.from_env({"DEMIX_PORT": "eighty"})


def test_every_setting_is_documented():
    for name, _default, doc in Settings.describe():
        assert name.startswith("DEMIX_") and doc.strip()


def test_a_value_outside_the_choices_names_them():
    assert Settings.from_env({"DEMIX_PRECISION": "bf16"}).precision == "bf16"
    with pytest.raises(ValueError, match="DEMIX_PRECISION='int8' is not one of fp32, bf16, fp16"):
        Settings.from_env({"DEMIX_PRECISION": "int8"})


def test_lifecycle_settings_defaults_and_overrides():
    defaults = Settings.from_env({})
    assert (defaults.retention_s, defaults.sweep_interval_s, defaults.min_free_mb) == (86400, 60, 1024)
    assert defaults.min_free_bytes == 1024 * 1024 * 1024
    tuned = Settings.from_env({"DEMIX_RETENTION_S": "0", "DEMIX_SWEEP_INTERVAL_S": "5",
                               "DEMIX_MIN_FREE_MB": "10"})
    assert (tuned.retention_s, tuned.sweep_interval_s, tuned.min_free_bytes) == (0, 5, 10 * 1024 * 1024)


def test_every_setting_is_in_the_settings_table_of_docs_operations():
    doc = (Path(__file__).parent.parent / "docs" / "operations.md").read_text()
    table = doc[doc.index("## Settings"):]
    for name, _default, _doc in Settings.describe():
        assert f"`{name}`" in table, (f"{name} is missing from the settings table of docs/operations.md: "
                                      "regenerate it with `.venv/bin/python tools/settings_table.py`")


def test_the_public_url_defaults_to_the_api_address():
    assert Settings.from_env({"DEMIX_PORT": "9001"}).effective_public_url == "http://127.0.0.1:9001"
    assert Settings.from_env({"DEMIX_PUBLIC_URL": "https://demix.example/"}).effective_public_url \
        == "https://demix.example"
