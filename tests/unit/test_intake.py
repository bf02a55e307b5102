"""Reading the task's ``request`` argument (tasks/intake.py): a request, or an error with its id."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given
from hypothesis import settings as settings_profile
from hypothesis import strategies as st
from pydantic import ValidationError

from providers import errors
from settings import Settings
from tasks.contract.schemas import ChatRequest, usable_request_id
from tasks.intake import read_request

SettingsFactory = Callable[..., Settings]  # the make_settings fixture of conftest.py

TASK_ID = "celery-task-1"


@pytest.fixture
def settings(make_settings: SettingsFactory) -> Settings:
    return make_settings(
        {"steady": {"text": "hello"}},
        {"default": ["steady"], "rehearsal": ["steady"]},
        max_messages=4,
        max_input_chars=100,
        max_message_bytes=1_000,
    )


def ok(**fields: Any) -> dict[str, Any]:
    return {"request_id": "r-1", "prompt": "hi", **fields}


def test_valid_dict(settings: Settings) -> None:
    intake = read_request(ok(chain="rehearsal", metadata={"k": "v"}), TASK_ID, settings)
    assert intake.error is None
    assert intake.request is not None
    assert intake.request_id == "r-1" == intake.request.request_id
    assert intake.request.chain == "rehearsal"
    assert [m.content for m in intake.request.conversation] == ["hi"]


@pytest.mark.parametrize("encode", [False, True])
def test_json_text(settings: Settings, encode: bool) -> None:
    text = json.dumps(ok())
    intake = read_request(text.encode() if encode else text, TASK_ID, settings)
    assert intake.error is None and intake.request is not None
    assert intake.request.request_id == "r-1"


@pytest.mark.parametrize("raw", ["{not json", "", "[1,", '"unterminated', "[" * 100_000])
def test_invalid_json(make_settings: SettingsFactory, raw: str) -> None:
    intake = read_request(raw, TASK_ID, make_settings(max_message_bytes=1_000_000))
    assert isinstance(intake.error, errors.InvalidRequest)
    assert "not valid JSON" in intake.error.message
    assert intake.request is None
    assert intake.request_id == TASK_ID


@pytest.mark.parametrize("raw", [[1, 2], "[1, 2]", "42", 42, None, "null", '"just a string"'])
def test_non_object(settings: Settings, raw: Any) -> None:
    intake = read_request(raw, TASK_ID, settings)
    assert isinstance(intake.error, errors.InvalidRequest)
    assert "JSON object" in intake.error.message
    assert intake.request_id == TASK_ID


@pytest.mark.parametrize("bad_id", ["has space", "a:b", "", 17, "x" * 200])
def test_bad_request_id_is_reported_to_the_task_id(settings: Settings, bad_id: Any) -> None:
    intake = read_request(ok(request_id=bad_id), TASK_ID, settings)
    assert isinstance(intake.error, errors.InvalidRequest)
    assert intake.error.code == "invalid_request"
    assert intake.request_id == TASK_ID


def test_missing_request_id_uses_the_task_id(settings: Settings) -> None:
    intake = read_request({"prompt": "hi"}, TASK_ID, settings)
    assert intake.error is None and intake.request is not None
    assert intake.request.request_id == TASK_ID == intake.request_id


def test_no_usable_id_at_all(settings: Settings) -> None:
    intake = read_request({"prompt": "hi"}, "bad task:id", settings)
    assert isinstance(intake.error, errors.InvalidRequest)
    assert intake.request_id is None
    assert read_request({"prompt": "hi"}, None, settings).request_id is None


def test_validation_error_names_the_field(settings: Settings) -> None:
    intake = read_request(ok(messages=[{"role": "robot", "content": "x"}], prompt=None), TASK_ID, settings)
    intake_with_both = read_request(ok(messages=[{"role": "user", "content": "x"}]), TASK_ID, settings)
    assert isinstance(intake.error, errors.InvalidRequest)
    assert "messages.0.role" in intake.error.message
    assert isinstance(intake_with_both.error, errors.InvalidRequest)
    assert intake.request_id == "r-1"  # the producer's id is usable even though the request is not


def test_routing_keys_in_generation_kwargs_are_invalid(settings: Settings) -> None:
    intake = read_request(ok(generation_kwargs={"base_url": "http://evil.invalid"}), TASK_ID, settings)
    assert isinstance(intake.error, errors.InvalidRequest)
    assert "base_url" in intake.error.message
    assert "evil.invalid" not in intake.error.message


def test_too_many_messages(settings: Settings) -> None:
    messages = [{"role": "user", "content": "x"}] * 5
    intake = read_request({"request_id": "r-1", "messages": messages}, TASK_ID, settings)
    assert isinstance(intake.error, errors.RequestTooLarge)
    assert intake.error.code == "request_too_large"
    assert intake.request_id == "r-1"


def test_too_many_characters(settings: Settings) -> None:
    intake = read_request(ok(prompt="x" * 60, system_prompt="y" * 41), TASK_ID, settings)
    assert isinstance(intake.error, errors.RequestTooLarge)
    assert "101 characters" in intake.error.message


def test_limits_are_inclusive(settings: Settings) -> None:
    messages = [{"role": "user", "content": "x" * 25}] * 4
    intake = read_request({"request_id": "r-1", "messages": messages}, TASK_ID, settings)
    assert intake.error is None


def test_unknown_chain(settings: Settings) -> None:
    intake = read_request(ok(chain="nope"), TASK_ID, settings)
    assert isinstance(intake.error, errors.UnknownChain)
    assert intake.error.code == "unknown_chain"
    assert "nope" in intake.error.message
    assert intake.request_id == "r-1"


def test_default_chain_must_exist(make_settings: SettingsFactory) -> None:
    settings = make_settings({"steady": {"text": "x"}}, {"other": ["steady"]})
    assert isinstance(read_request(ok(), TASK_ID, settings).error, errors.UnknownChain)


@pytest.mark.parametrize("encode", [False, True])
def test_oversize_raw_message(settings: Settings, encode: bool) -> None:
    text = json.dumps(ok(metadata={"pad": "x" * 2_000}))
    intake = read_request(text.encode() if encode else text, TASK_ID, settings)
    assert isinstance(intake.error, errors.RequestTooLarge)
    assert "bytes" in intake.error.message
    assert intake.request_id == TASK_ID  # nothing was parsed, so only the task id is known


def test_oversize_is_measured_in_bytes(make_settings: SettingsFactory) -> None:
    settings = make_settings(max_message_bytes=1_000, max_input_chars=10_000)
    text = json.dumps(ok(prompt="é" * 600), ensure_ascii=False)  # 600 characters, 1 200 bytes of UTF-8
    assert len(text) < 1_000 < len(text.encode())
    assert isinstance(read_request(text, TASK_ID, settings).error, errors.RequestTooLarge)


@pytest.mark.parametrize("field", ["request_id", "task_id"])
def test_a_trailing_newline_does_not_make_an_id_usable(settings: Settings, field: str) -> None:
    # Python's "$" also matches before a final newline; the id must match as a whole.
    raw = {"prompt": "hi", "request_id": "r-1\n"} if field == "request_id" else {"prompt": "hi"}
    intake = read_request(raw, "t-1\n" if field == "task_id" else TASK_ID, settings)
    assert intake.request is None
    assert intake.request_id == (TASK_ID if field == "request_id" else None)


@given(st.text(alphabet=st.sampled_from("aZ09._-:\n {}é"), max_size=6) | st.from_regex(r"[A-Za-z0-9._\-]{1,130}"))
@settings_profile(max_examples=100, deadline=None)
def test_intake_and_schema_agree_on_request_ids(candidate: str) -> None:
    try:
        ChatRequest.model_validate({"prompt": "x", "request_id": candidate})
    except ValidationError:
        schema_accepts = False
    else:
        schema_accepts = True
    assert (usable_request_id(candidate) is not None) == schema_accepts


def test_large_metadata_is_refused(settings: Settings) -> None:
    from tasks.intake import MAX_METADATA_BYTES

    body = {"request_id": "big-meta", "prompt": "hi", "metadata": {"blob": "x" * (MAX_METADATA_BYTES + 1)}}
    intake = read_request(body, "task-1", settings)
    assert isinstance(intake.error, errors.RequestTooLarge)
    assert "metadata" in intake.error.message


@pytest.mark.parametrize(("field", "cap_setting"), [("n", "max_choices"), ("num_beams", "max_num_beams")])
def test_counts_past_the_workers_caps_are_refused_by_name(
    make_settings: SettingsFactory, field: str, cap_setting: str
) -> None:
    """Operator limits win: a request may ask for fewer choices or beams than the cap, never more."""
    settings = make_settings(**{cap_setting: 3})
    at_cap = read_request(ok(generation_kwargs={field: 3}), TASK_ID, settings)
    assert at_cap.error is None and at_cap.request is not None
    over = read_request(ok(generation_kwargs={field: 4}), TASK_ID, settings)
    assert isinstance(over.error, errors.RequestTooLarge) and over.request_id == "r-1"
    assert over.error.message == f"generation_kwargs.{field} of 4 exceeds this worker's limit of 3"


@pytest.mark.parametrize("field", ["num_beams", "max_new_tokens", "max_completion_tokens", "min_new_tokens"])
@pytest.mark.parametrize("value", [0, -1, True, 2.5, "8", [1], 10**12])
def test_counts_must_be_whole_numbers(settings: Settings, field: str, value: Any) -> None:
    intake = read_request(ok(generation_kwargs={field: value}), TASK_ID, settings)
    assert isinstance(intake.error, errors.InvalidRequest) and f"generation_kwargs.{field}" in intake.error.message


def test_default_caps_are_safe() -> None:
    assert Settings().max_choices == 4 and Settings().max_num_beams == 4
