"""Settings come from SKUFLEET_* variables; deploy files only set real ones."""

from __future__ import annotations

from pathlib import Path

import pytest

from skufleet.schemas.errors import ConfigError
from skufleet.schemas.redact import redact_text, redact_url
from skufleet.schemas.settings import Settings, load_settings

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


PASSWORD = "s3cr3t-pa55"


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("REDIS_URL", f"http://:{PASSWORD}@redis.internal/0", "scheme 'http' is not redis, rediss"),
        ("REDIS_URL", f"redis://:{PASSWORD}/0", "malformed URL"),  # the password parses as a port
        ("REDIS_URL", "unix:///run/redis.sock", "redis+socket:///PATH for a Unix socket"),
        ("DATABASE_URL", f"mysql://skufleet:{PASSWORD}@db/ledger", "driver 'mysql' is not supp"),
        ("DATABASE_URL", f"postgresql+psycopg2://u:{PASSWORD}@db/x", "'postgresql+psycopg2' is"),
        ("DATABASE_URL", f"{PASSWORD}", "not a database URL: use postgresql://"),
        ("S3_ENDPOINT_URL", f"ftp://ak:{PASSWORD}@minio:9000", "http:// or https:// URL, not ftp"),
        ("S3_ENDPOINT_URL", f"http://minio:9000/?token={PASSWORD}", "no query string"),
        ("S3_ENDPOINT_URL", "http://:9000", "has no host"),
        ("WEBHOOK_URL", f"hooks.example/services/{PASSWORD}", "http:// or https:// URL"),
        ("WEBHOOK_URL", f"https://hooks.example/{PASSWORD}\r\nX-Injected: 1", "control character"),
    ],
)
def test_malformed_service_urls_are_refused_naming_the_variable_never_the_password(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, message: str
) -> None:
    """A URL with the wrong scheme, no host, an unreadable port or an unsupported database
    driver is one line naming the SKUFLEET_ variable and the problem, without the value."""
    monkeypatch.setenv(f"SKUFLEET_{variable}", value)
    with pytest.raises(ConfigError) as raised:
        load_settings()
    text = str(raised.value)
    assert text.startswith(f"invalid setting SKUFLEET_{variable}: ")
    assert message in text and "\n" not in text
    assert PASSWORD not in text and "input_value" not in text


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("REDIS_URL", f"redis://:{PASSWORD}@redis.internal:6379/0"),
        ("REDIS_URL", "rediss://default:x@redis.example:6380/1?ssl_cert_reqs=required"),
        ("REDIS_URL", "redis+socket:///run/redis/redis.sock"),
        ("DATABASE_URL", f"postgresql://skufleet:{PASSWORD}@db/ledger"),
        ("DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"),
        ("DATABASE_URL", "postgres://db/ledger"),
        ("DATABASE_URL", "sqlite:////var/lib/skufleet/ledger.db"),
        ("S3_ENDPOINT_URL", "http://minio.internal:9000"),
        ("S3_ENDPOINT_URL", "https://s3.eu-west-1.amazonaws.com"),
        ("WEBHOOK_URL", f"https://hooks.example/services/{PASSWORD}?token={PASSWORD}"),
    ],
)
def test_supported_service_urls_are_accepted(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    """Redis over TCP, TLS or a Unix socket, PostgreSQL (psycopg 3) or SQLite, and http(s)
    S3 endpoints and webhooks are taken as given."""
    monkeypatch.setenv(f"SKUFLEET_{variable}", value)
    assert getattr(load_settings(), variable.lower()) == value


def test_urls_are_shown_without_passwords_tokens_or_query_strings() -> None:
    """redact_url masks the userinfo password and the query; for a webhook it keeps only
    scheme://host/…; redact_text does the same to every URL quoted inside a message."""
    assert redact_url(f"redis://:{PASSWORD}@redis:6379/0") == "redis://:***@redis:6379/0"
    assert redact_url(f"http://ak:{PASSWORD}@minio:9000") == "http://ak:***@minio:9000"
    assert redact_url(f"rediss://redis/0?password={PASSWORD}") == "rediss://redis/0?…"
    assert redact_url("sqlite:////var/lib/ledger.db") == "sqlite:////var/lib/ledger.db"
    assert redact_url(f"postgresql://u:12/{PASSWORD}@db/x") == "postgresql://***"
    webhook = f"https://{PASSWORD}@hooks.example:8443/services/{PASSWORD}?token={PASSWORD}"
    assert redact_url(webhook, keep_path=False) == "https://***@hooks.example:8443/…?…"
    message = f'Could not connect to the endpoint URL: "http://ak:{PASSWORD}@127.0.0.1:1/b/k"'
    assert (
        redact_text(message)
        == 'Could not connect to the endpoint URL: "http://ak:***@127.0.0.1:1/b/k"'
    )
