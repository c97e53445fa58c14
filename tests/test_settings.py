"""Settings come from SKUFLEET_* variables; deploy files only set real ones."""

from __future__ import annotations

from pathlib import Path

import pytest

from schemas.settings import Settings

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


def test_defaults_serve_a_single_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    """With nothing set, skufleet points at local Redis, a SQLite file and AWS S3."""
    for name in list(Settings.model_fields):
        monkeypatch.delenv(f"SKUFLEET_{name.upper()}", raising=False)
    settings = Settings()
    assert settings.redis_url == "redis://127.0.0.1:6379/0"
    assert settings.database_url == "sqlite:///skufleet.db"
    assert settings.s3_endpoint_url is None
    assert settings.s3_bucket == "skufleet"
    assert settings.model == "stable-diffusion-v1-5/stable-diffusion-v1-5"


def test_variables_override_defaults_and_empty_endpoint_means_aws(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each setting is read from its SKUFLEET_ name; an empty endpoint is AWS itself."""
    monkeypatch.setenv("SKUFLEET_S3_ENDPOINT_URL", "")
    monkeypatch.setenv("SKUFLEET_MAX_ATTEMPTS", "5")
    settings = Settings()
    assert (settings.s3_endpoint_url, settings.max_attempts) == (None, 5)


def test_invalid_values_are_refused_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    """A nonsensical value is an error naming the setting, not a silent default."""
    monkeypatch.setenv("SKUFLEET_MAX_ATTEMPTS", "0")
    with pytest.raises(ValueError, match="max_attempts"):
        Settings()


def test_env_example_sets_only_real_settings() -> None:
    """Every SKUFLEET_ variable in deploy/env.example is a setting skufleet reads."""
    names = [
        line.split("=", 1)[0]
        for line in (DEPLOY / "env.example").read_text().splitlines()
        if line.startswith("SKUFLEET_")
    ]
    known = {f"SKUFLEET_{field.upper()}" for field in Settings.model_fields}
    assert names and set(names) <= known
