"""Typed configuration: TOML file, CASCADE_* env vars over it, errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from settings import ConfigError, ScriptedConfig, Settings, load_settings, redact_url
from settings.providers import OpenAIImageConfig

GOOD_TOML = """
reply_ttl_s = 600
max_messages = 32

[providers.steady]
type = "scripted"
text = "Natural Language Processing is ..."
chunk_size = 4

[providers.flaky]
type = "scripted"
text = "fallback text"
fail = "rate_limit"
fail_times = 1
queue = "chat.other"

[chains]
default = ["flaky", "steady"]
rehearsal = ["steady"]
"""


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No CASCADE_* variable of the machine running the tests leaks in."""
    import os

    for name in list(os.environ):
        if name.startswith("CASCADE_"):
            monkeypatch.delenv(name)


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cascade.toml"
    path.write_text(text)
    return path


def _config_error(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as info:
        load_settings(_write(tmp_path, text))
    return str(info.value)


def test_load_from_toml(tmp_path: Path) -> None:
    settings = load_settings(_write(tmp_path, GOOD_TOML))
    assert settings.reply_ttl_s == 600
    assert settings.max_messages == 32
    assert settings.chains == {"default": ["flaky", "steady"], "rehearsal": ["steady"]}
    steady = settings.providers["steady"]
    assert isinstance(steady, ScriptedConfig)
    assert steady.chunk_size == 4
    assert settings.queue_of("flaky") == "chat.other"
    assert settings.queue_of("steady") == "chat"
    assert settings.config == tmp_path / "cascade.toml"


def test_config_path_from_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CASCADE_CONFIG", str(_write(tmp_path, GOOD_TOML)))
    assert load_settings().chains["rehearsal"] == ["steady"]


def test_env_overrides_toml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CASCADE_REPLY_TTL_S", "42")
    monkeypatch.setenv("CASCADE_MAX_MESSAGES", "7")
    monkeypatch.setenv("CASCADE_REDIS_URL", "redis://cache.internal:6380/2")
    settings = load_settings(_write(tmp_path, GOOD_TOML))
    assert settings.reply_ttl_s == 42
    assert settings.max_messages == 7
    assert settings.redis_dsn == "redis://cache.internal:6380/2"
    assert "steady" in settings.providers  # the file still supplies what env does not


def test_explicit_overrides_win_over_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CASCADE_REPLY_TTL_S", "42")
    assert load_settings(_write(tmp_path, GOOD_TOML), reply_ttl_s=5).reply_ttl_s == 5


def test_defaults_without_a_file() -> None:
    settings = load_settings()
    assert settings.providers == {} and settings.chains == {}
    assert settings.redis_dsn == "redis://127.0.0.1:6379/0"
    assert settings.config is None


def test_bad_provider_field_names_its_key(tmp_path: Path) -> None:
    message = _config_error(tmp_path, '[providers.steady]\ntype = "scripted"\ntext = "x"\nchunk_size = 0\n')
    assert "providers.steady.chunk_size" in message
    assert str(tmp_path / "cascade.toml") in message


def test_unknown_provider_field_names_its_key(tmp_path: Path) -> None:
    message = _config_error(tmp_path, '[providers.steady]\ntype = "scripted"\ntext = "x"\nspeed = 3\n')
    assert "providers.steady.speed" in message


def test_unknown_provider_in_chain(tmp_path: Path) -> None:
    text = '[providers.steady]\ntype = "scripted"\ntext = "x"\n[chains]\ndefault = ["steady", "ghost"]\n'
    message = _config_error(tmp_path, text)
    assert "chains.default[1]: unknown provider 'ghost'" in message


def test_empty_chain_is_refused(tmp_path: Path) -> None:
    assert "chains.default" in _config_error(tmp_path, "[chains]\ndefault = []\n")


def test_unknown_provider_type(tmp_path: Path) -> None:
    message = _config_error(tmp_path, '[providers.odd]\ntype = "carrier_pigeon"\n')
    assert "providers.odd.type" in message
    assert "carrier_pigeon" in message


def test_unknown_top_level_key(tmp_path: Path) -> None:
    message = _config_error(tmp_path, 'redis_uri = "redis://x"\n')
    assert "unknown top-level key" in message
    assert "redis_uri" in message


def test_invalid_toml(tmp_path: Path) -> None:
    message = _config_error(tmp_path, "[providers.steady\ntype = \n")
    assert "not valid TOML" in message


def test_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match="no such file"):
        load_settings(missing)


def test_bad_top_level_value_names_its_key(tmp_path: Path) -> None:
    assert "reply_ttl_s" in _config_error(tmp_path, "reply_ttl_s = 0\n")


def test_every_problem_is_reported(tmp_path: Path) -> None:
    text = '[providers.a]\ntype = "scripted"\ntext = "x"\nchunk_size = 0\n[providers.b]\ntype = "scripted"\ntext = ""\n'
    message = _config_error(tmp_path, text)
    assert "providers.a.chunk_size" in message
    assert "providers.b.text" in message


def test_bad_env_value_raises_config_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CASCADE_EVENTS_MAXLEN", "3")
    with pytest.raises(ConfigError, match="events_maxlen"):
        load_settings(_write(tmp_path, GOOD_TOML))


def test_redis_password_never_shown(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CASCADE_REDIS_URL", "rediss://worker:s3cr3t-pw@redis.example:6380/1")
    settings = load_settings()
    assert "s3cr3t-pw" not in repr(settings)
    assert "s3cr3t-pw" not in str(settings)
    assert "s3cr3t-pw" not in settings.redis_url_redacted
    assert settings.redis_url_redacted == "rediss://worker:***@redis.example:6380/1"
    assert settings.redis_dsn == "rediss://worker:s3cr3t-pw@redis.example:6380/1"


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://:pw@localhost:6379/0", "redis://:***@localhost:6379/0"),
        ("rediss://user:pw@host/0", "rediss://user:***@host/0"),
        ("redis://localhost:6379/0", "redis://localhost:6379/0"),
        ("redis://user@localhost:6379/0", "redis://user@localhost:6379/0"),
        ("redis://:pw@[::1]:6379/0", "redis://:***@[::1]:6379/0"),
    ],
)
def test_redact_url(url: str, expected: str) -> None:
    assert redact_url(url) == expected


def test_derived_celery_limits_are_ordered() -> None:
    settings = Settings(max_timeout_s=600)
    assert settings.max_timeout_s < settings.task_soft_time_limit_s
    assert settings.task_soft_time_limit_s < settings.hard_time_limit_s
    assert settings.hard_time_limit_s < settings.broker_visibility_timeout_s


def test_explicit_limits_must_stay_ordered() -> None:
    with pytest.raises(ValueError, match="time_limit_s"):
        Settings(soft_time_limit_s=100, time_limit_s=100)
    with pytest.raises(ValueError, match="visibility_timeout_s"):
        Settings(soft_time_limit_s=100, time_limit_s=200, visibility_timeout_s=150)
    with pytest.raises(ValueError, match="default_timeout_s"):
        Settings(default_timeout_s=100, max_timeout_s=50)


def test_settings_are_frozen() -> None:
    settings = Settings()
    with pytest.raises(ValueError):
        settings.reply_ttl_s = 1  # type: ignore[misc]


def test_config_keyword_with_a_path_is_not_passed_twice(tmp_path: Path) -> None:
    path = _write(tmp_path, GOOD_TOML)
    assert load_settings(config=path).chains["rehearsal"] == ["steady"]
    assert load_settings(path, config=path).config == path


def test_redact_url_masks_a_password_query_parameter() -> None:
    from settings import redact_url

    masked = redact_url("redis://127.0.0.1:6379/0?password=hunter2&socket_timeout=5")
    assert "hunter2" not in masked
    assert "socket_timeout=5" in masked


def test_worker_redis_clients_time_out_and_keep_alive(monkeypatch: pytest.MonkeyPatch) -> None:
    """A Redis gone silent must not hang a worker: its clients have a socket timeout (above the
    broker's 1 s BRPOP), a connect timeout, TCP keepalive and health checks."""
    from worker.runtime import redis_client

    monkeypatch.setenv("CASCADE_REDIS_SOCKET_TIMEOUT_S", "3")
    settings = Settings()
    options = redis_client(settings).connection_pool.connection_kwargs
    assert options["socket_timeout"] == 3.0
    assert options["socket_connect_timeout"] == settings.redis_connect_timeout_s == 5.0
    assert options["socket_keepalive"] is True
    assert options["health_check_interval"] == settings.redis_health_check_interval_s == 15
    assert Settings().redis_socket_options == {
        "socket_timeout": 3.0,
        "socket_connect_timeout": 5.0,
        "socket_keepalive": True,
        "health_check_interval": 15,
    }
    with pytest.raises(ValueError, match="redis_socket_timeout_s"):
        Settings(redis_socket_timeout_s=1)


IMAGE_TOML = """
[providers.dalle]
type = "openai_image"
model = "dall-e-3"
response_format = "url"
max_image_bytes = 10485760

[providers.azure_images]
type = "azure_openai_image"
azure_endpoint = "https://example.openai.azure.com"
azure_deployment = "gpt-image-1-prod"
model = "gpt-image-1"
partial_images = 2

[chains]
images = ["azure_images", "dalle"]
"""


def test_image_provider_types_load_from_toml(tmp_path: Path) -> None:
    from settings.providers import AzureOpenAIImageConfig, OpenAIImageConfig

    settings = load_settings(_write(tmp_path, IMAGE_TOML))
    dalle, azure = settings.providers["dalle"], settings.providers["azure_images"]
    assert isinstance(dalle, OpenAIImageConfig) and isinstance(azure, AzureOpenAIImageConfig)
    assert (dalle.model, dalle.response_format, dalle.max_image_bytes, dalle.api_key_env) == (
        "dall-e-3",
        "url",
        10 * 1024 * 1024,
        "OPENAI_API_KEY",
    )
    assert (azure.model_name, azure.partial_images, azure.api_version, azure.max_image_bytes) == (
        "gpt-image-1",
        2,
        "2025-04-01-preview",
        20 * 1024 * 1024,
    )
    assert settings.chains["images"] == ["azure_images", "dalle"]


@pytest.mark.parametrize(
    ("line", "key"),
    [
        ('stop_words = ["x"]', "stop_words"),
        ("max_output_tokens = 10", "max_output_tokens"),
        ("partial_images = 4", "partial_images"),
        ("max_images = 11", "max_images"),
        ("max_image_bytes = 0", "max_image_bytes"),
        ('response_format = "png"', "response_format"),
    ],
)
def test_a_bad_image_provider_field_names_its_key(tmp_path: Path, line: str, key: str) -> None:
    message = _config_error(tmp_path, f'[providers.dalle]\ntype = "openai_image"\nmodel = "dall-e-2"\n{line}\n')
    assert key in message
    assert "providers.dalle" in message


def test_every_provider_type_has_a_provider_class() -> None:
    from providers.registry import PROVIDER_CLASSES
    from settings.providers import PROVIDER_CONFIG_TYPES

    assert set(PROVIDER_CONFIG_TYPES) == set(PROVIDER_CLASSES)


CAPABILITY_TOML = """
[providers.gpt]
type = "openai"
model = "gpt-4.1-mini"

[providers.local-vllm]
type = "openai"
model = "qwen"
api_base_url = "http://127.0.0.1:8000/v1"
supports_images = false
supports_n = false

[providers.resp]
type = "openai_responses"
model = "o4-mini"

[providers.tgi]
type = "hf_api"
api_type = "text_generation_inference"
url = "http://127.0.0.1:8080"

[providers.vision-tgi]
type = "hf_api"
api_type = "text_generation_inference"
url = "http://127.0.0.1:8081"
supports_images = true

[providers.smol]
type = "hf_local"
model = "HuggingFaceTB/SmolLM2-135M-Instruct"

[providers.caller]
type = "scripted"
tool_calls = [{ name = "get_weather", arguments = '{"city": "Paris"}' }]

[chains]
default = ["gpt"]
"""


def test_capabilities_default_per_type_and_are_overridden_per_entry(tmp_path: Path) -> None:
    providers = load_settings(_write(tmp_path, CAPABILITY_TOML)).providers
    caps = {provider_id: tuple(config.capabilities()) for provider_id, config in providers.items()}
    # (tools, images, json_schema, n)
    assert caps == {
        "gpt": (True, True, True, True),
        "local-vllm": (True, False, True, False),
        "resp": (True, True, True, False),
        "tgi": (True, False, True, False),
        "vision-tgi": (True, True, True, False),
        "smol": (True, False, False, False),
        "caller": (True, True, True, True),
    }


def test_scripted_tool_calls_stand_in_for_text(tmp_path: Path) -> None:
    caller = load_settings(_write(tmp_path, CAPABILITY_TOML)).providers["caller"]
    assert isinstance(caller, ScriptedConfig)
    assert caller.text == ""
    assert [(call.name, call.arguments) for call in caller.tool_calls] == [("get_weather", '{"city": "Paris"}')]


def test_a_capability_must_be_a_boolean(tmp_path: Path) -> None:
    text = '[providers.a]\ntype = "scripted"\ntext = "x"\nsupports_tools = "maybe"\n'
    assert "providers.a.supports_tools" in _config_error(tmp_path, text)


def test_a_scripted_tool_call_needs_a_valid_name(tmp_path: Path) -> None:
    text = '[providers.a]\ntype = "scripted"\ntool_calls = [{ name = "get weather" }]\n'
    assert "providers.a.tool_calls.0.name" in _config_error(tmp_path, text)


def test_a_chain_mixing_chat_and_image_providers_is_a_config_error_naming_the_chain() -> None:
    providers = {"painter": OpenAIImageConfig(model="dall-e-3"), "talker": ScriptedConfig(text="hi")}
    with pytest.raises(ValidationError) as raised:
        Settings(providers=providers, chains={"mixed": ["talker", "painter"]})
    assert "chains.mixed: mixes image providers (painter) with chat providers (talker)" in str(raised.value)
    settings = Settings(providers=providers, chains={"images": ["painter"], "default": ["talker"]})
    assert settings.is_image_chain("images") and not settings.is_image_chain("default")
    assert not settings.is_image_chain("nowhere")


def test_an_image_is_bounded_by_its_provider_and_by_the_worker() -> None:
    providers = {
        "small": OpenAIImageConfig(model="dall-e-3", max_image_bytes=1_000),
        "big": OpenAIImageConfig(model="gpt-image-1"),
    }
    settings = Settings(providers=providers, chains={"images": ["small", "big"]}, max_image_bytes=5_000)
    assert settings.image_bytes_limit("small") == 1_000
    assert settings.image_bytes_limit("big") == 5_000
