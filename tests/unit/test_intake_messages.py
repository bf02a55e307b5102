"""Intake of messages v2 (tasks/intake.py): the worker's image caps (settings smaller than the
schema's), the scoring option's bound on decision calls, and bad tools, tool messages, images
and schemas refused with the field named."""

from __future__ import annotations

import base64
from collections.abc import Callable
from typing import Any

import pytest

from providers import errors
from providers.scoring import MAX_DECISION_SAMPLES
from settings import Settings
from tasks.intake import read_request

SettingsFactory = Callable[..., Settings]  # the make_settings fixture of conftest.py

PNG = b"\x89PNG\r\n\x1a\n" + bytes(92)  # 100 bytes that start as a PNG does


def png_part(size: int = len(PNG)) -> dict[str, Any]:
    data = PNG + bytes(max(0, size - len(PNG)))
    return {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{base64.b64encode(data).decode()}"}}


def url_part(url: str = "https://images.example.com/cat.png") -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url}}


def request_with(*parts: dict[str, Any]) -> dict[str, Any]:
    content = [{"type": "text", "text": "What is in these pictures?"}, *parts]
    return {"request_id": "img-1", "messages": [{"role": "user", "content": content}]}


def test_images_within_the_caps_are_taken(make_settings: SettingsFactory) -> None:
    settings = make_settings(max_input_image_bytes=200, max_input_images=3)
    intake = read_request(request_with(png_part(100), png_part(100), url_part()), "t", settings)
    assert intake.error is None and intake.request is not None


def test_image_bytes_past_the_cap_are_refused_naming_the_image(make_settings: SettingsFactory) -> None:
    settings = make_settings(max_input_image_bytes=150)
    intake = read_request(request_with(png_part(100), png_part(100)), "t", settings)
    assert isinstance(intake.error, errors.RequestTooLarge) and intake.request_id == "img-1"
    assert (
        intake.error.message == "messages.0.content.2.image_url: 200 bytes of images exceed this worker's limit of 150"
    )


def test_images_past_the_count_are_refused(make_settings: SettingsFactory) -> None:
    settings = make_settings(max_input_images=1)
    intake = read_request(request_with(url_part(), url_part()), "t", settings)
    assert isinstance(intake.error, errors.RequestTooLarge)
    assert intake.error.message.startswith("messages.0.content.2.image_url: more than")


def test_https_image_urls_can_be_turned_off(make_settings: SettingsFactory) -> None:
    settings = make_settings(allow_image_urls=False)
    assert read_request(request_with(png_part()), "t", settings).error is None
    intake = read_request(request_with(png_part(), url_part()), "t", settings)
    assert isinstance(intake.error, errors.InvalidRequest)
    assert intake.error.message.startswith("messages.0.content.2.image_url.url: ")


def test_the_image_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CASCADE_MAX_INPUT_IMAGE_BYTES", "1234")
    monkeypatch.setenv("CASCADE_MAX_INPUT_IMAGES", "2")
    monkeypatch.setenv("CASCADE_ALLOW_IMAGE_URLS", "false")
    settings = Settings()
    assert (settings.max_input_image_bytes, settings.max_input_images, settings.allow_image_urls) == (1234, 2, False)


def test_default_image_caps_sit_below_the_message_size() -> None:
    settings = Settings()
    assert settings.allow_image_urls is True
    assert 0 < settings.max_input_image_bytes and 0 < settings.max_input_images


def test_a_scoring_config_past_the_call_bound_is_refused_naming_the_field(make_settings: SettingsFactory) -> None:
    settings = make_settings()
    fine = read_request(
        {"request_id": "s-1", "prompt": "hi", "hallucination_score": {"n_samples": 4, "m": 3}}, "t", settings
    )
    assert fine.error is None
    over = {"n_samples": 32, "m": 16}  # each within its field's range; 32 * 17 calls in all
    assert 32 * 17 > MAX_DECISION_SAMPLES
    intake = read_request({"request_id": "s-2", "prompt": "hi", "hallucination_score": over}, "t", settings)
    assert isinstance(intake.error, errors.InvalidRequest) and intake.request_id == "s-2"
    assert intake.error.message.startswith("invalid request: hallucination_score: n_samples * (m + 1) = 32 * 17")


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        pytest.param({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools.0", id="tool-name"),
        pytest.param({"tools": [{"type": "function"}]}, "tools.0.function", id="tool-without-function"),
        pytest.param(
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "nope"}}}]},
            "tools.0.function.parameters",
            id="tool-parameters-not-a-schema",
        ),
        pytest.param(
            {"messages": [{"role": "user", "content": "hi"}, {"role": "tool", "tool_call_id": "x", "content": "r"}]},
            "messages.1.tool_call_id",
            id="tool-message-without-call",
        ),
        pytest.param(
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,aGVsbG8="}}],
                    }
                ]
            },
            "messages.0.content.0.image_url.url",
            id="image-that-is-not-an-image",
        ),
        pytest.param(
            {
                "generation_kwargs": {
                    "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 5}}}
                }
            },
            "generation_kwargs.response_format.json_schema.schema",
            id="schema-that-is-not-a-schema",
        ),
    ],
)
def test_bad_messages_v2_input_names_the_field(settings_v2: Settings, fields: dict[str, Any], named: str) -> None:
    raw = {"request_id": "bad-1", **({"prompt": "hi"} if "messages" not in fields else {}), **fields}
    intake = read_request(raw, "t", settings_v2)
    assert isinstance(intake.error, errors.InvalidRequest) and intake.request_id == "bad-1"
    assert named in intake.error.message, intake.error.message


@pytest.fixture
def settings_v2(make_settings: SettingsFactory) -> Settings:
    return make_settings()
