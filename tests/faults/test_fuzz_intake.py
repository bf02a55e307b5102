"""Hostile input, fuzzed (hypothesis): whatever arrives as the task's ``request`` keyword —
arbitrary JSON values, request-shaped objects with wrong or hostile fields, huge strings, JSON
text nested 100k deep, bytes that are not UTF-8, request ids full of Redis glob, colon and brace
characters — ``tasks.intake.read_request`` never raises: it returns a valid request or a
request-fatal error (``InvalidRequest``, ``RequestTooLarge``, ``UnknownChain``), and any id it
accepts is safe as a part of a Redis key. The task itself (run eagerly on fakeredis) never
raises either: it answers, or it dead-letters the input with a failed reply wherever there is
an id to report to.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from typing import Any

import fakeredis
import pytest
from hypothesis import HealthCheck, example, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from providers.errors import InvalidRequest, RequestTooLarge, UnknownChain
from settings import ScriptedConfig, Settings
from tasks.chat import chat
from tasks.contract import keys
from tasks.contract.schemas import MAX_CONTENT_CHARS, ChatReply
from tasks.intake import read_request
from worker.runtime import WorkerRuntime, build_runtime

pytestmark = pytest.mark.faults

SETTINGS = Settings(
    providers={"steady": ScriptedConfig(text="All good.", chunk_size=4)},
    chains={"default": ["steady"], "other.chain_1": ["steady"]},
    max_messages=8,
    max_input_chars=5_000,
    max_message_bytes=1_000_000,
)
REQUEST_FATAL = (InvalidRequest, RequestTooLarge, UnknownChain)
# Characters a Redis key part must never hold: glob, separators, braces (cluster hash tags),
# whitespace and control characters.
KEY_HOSTILE = "*?[]{}:\\/ \t\r\n\x00\x7f^!$%&'\"<>|~`#@,;=+()"
SAFE_KEY_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")

FUZZ = hypothesis_settings(
    max_examples=int(os.environ.get("CASCADE_FUZZ_EXAMPLES", "250")),
    deadline=None,
    database=None,  # nothing written to .hypothesis/
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
)

# --- strategies ----------------------------------------------------------------------------------

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**80), max_value=2**80)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=40)
)
json_values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=25,
)
hostile_text = st.text(alphabet=st.sampled_from(KEY_HOSTILE + "aZ09._-é€😀"), min_size=1, max_size=140)
request_ids = (
    st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", fullmatch=True)
    | hostile_text
    | st.text(max_size=200)
    | st.sampled_from(["a" * 128, "a" * 129, "-lead", ".lead", "a:b", "a*", "{a}", "a?b", "a[1]", "ok\n"])
    | json_values
)
huge_strings = st.sampled_from([5_001, 100_001, MAX_CONTENT_CHARS + 1]).map(lambda n: "x" * n)
lone_surrogates = st.text(alphabet=st.characters(categories=["Cs"]), min_size=1, max_size=3)
texts = st.text(max_size=60) | huge_strings | lone_surrogates | json_values
messages = (
    st.lists(
        st.fixed_dictionaries(
            {"role": st.sampled_from(["user", "system", "assistant", "robot", "tool"]) | json_values, "content": texts},
            optional={"name": st.text(max_size=5)},
        ),
        max_size=10,
    )
    | json_values
)
KWARG_NAMES = [
    "max_tokens",
    "temperature",
    "top_p",
    "stop",
    "seed",
    "presence_penalty",
    "api_key",
    "base_url",
    "extra_body",
    "extra_headers",
    "extra_query",
    "default_headers",
    "azure_deployment",
    "deployment",
    "provider",
    "model",
]
generation_kwargs = st.dictionaries(st.sampled_from(KWARG_NAMES) | st.text(max_size=12), json_values, max_size=5)
request_objects = st.fixed_dictionaries(
    {},
    optional={
        "request_id": request_ids,
        "messages": messages,
        "prompt": texts,
        "system_prompt": texts,
        "chain": st.sampled_from(["default", "other.chain_1", "nope", "a:b", "*", ""]) | st.text(max_size=70),
        "generation_kwargs": generation_kwargs | json_values,
        "stream": json_values,
        "timeout_s": json_values,
        "metadata": st.dictionaries(st.text(max_size=8), json_values | lone_surrogates, max_size=70) | json_values,
        "surprise": json_values,
    },
)


def nested_text(depth: int, opener: str = "[", closer: str = "]") -> str:
    return opener * depth + closer * depth


def nested_value(depth: int) -> Any:
    value: Any = "x"
    for _ in range(depth):
        value = [value]
    return value


deep_texts = st.sampled_from(
    [
        nested_text(100_000),
        "[" * 100_000,
        '{"a":' * 50_000 + "1" + "}" * 50_000,
        '{"prompt": "hi", "metadata": {"a": ' + nested_text(5_000) + "}}",
    ]
)
invalid_utf8 = st.binary(max_size=40).map(lambda raw: b'{"prompt": "\xff\xfe' + raw + b'"}') | st.sampled_from(
    [b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b'{"prompt": "\xe2\x82"}', b"\x00" * 8]
)
# A request object nested deeper than pydantic serialises (about 255 levels) but well within what
# JSON decoding accepts: the worker must refuse it, not crash on it.
deep_objects = st.sampled_from([300, 600]).map(
    lambda depth: {"request_id": "deep-1", "prompt": "hi", "metadata": {"a": nested_value(depth)}}
)
raw_inputs = st.one_of(
    json_values,
    request_objects,
    request_objects.map(lambda obj: json.dumps(obj)),
    request_objects.map(lambda obj: json.dumps(obj).encode("utf-8", "surrogatepass")),
    st.text(max_size=200),
    st.binary(max_size=200),
    deep_texts,
    invalid_utf8,
    deep_objects,
)
task_ids = st.none() | request_ids.filter(lambda value: value is None or isinstance(value, str))


def assert_safe_key_part(value: Any) -> None:
    assert isinstance(value, str) and SAFE_KEY_PART.fullmatch(value), repr(value)
    assert value.isascii() and not set(value) & set(KEY_HOSTILE)
    assert keys.reply_key(value).count(":") == 2  # it cannot add a key level of its own


# --- read_request --------------------------------------------------------------------------------


@FUZZ
@given(raw=raw_inputs, task_id=task_ids)
@example(raw=nested_text(100_000), task_id="t-1")
@example(raw=b'{"prompt": "\xff"}', task_id="t-1")
@example(raw={"request_id": "a:b*{c}", "prompt": "hi"}, task_id="t-1")
@example(raw={"prompt": "hi"}, task_id="*")
@example(raw={"prompt": "hi", "generation_kwargs": {"extra_body": {"model": "x"}}}, task_id="t-1")
def test_read_request_never_raises(raw: Any, task_id: Any) -> None:
    intake = read_request(raw, task_id, SETTINGS)
    if intake.error is None:
        assert intake.request is not None
        assert_safe_key_part(intake.request.request_id)
        assert intake.request_id == intake.request.request_id
        assert 1 <= len(intake.request.conversation) <= SETTINGS.max_messages
        assert intake.request.chain in SETTINGS.chains
    else:
        assert isinstance(intake.error, REQUEST_FATAL), intake.error
        assert intake.error.message and intake.error.code
        assert intake.request is None
    if intake.request_id is not None:
        assert_safe_key_part(intake.request_id)


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(nested_text(100_000), id="100k-brackets"),
        pytest.param("[" * 100_000, id="100k-unclosed"),
        pytest.param('{"a":' * 100_000, id="100k-objects"),
        pytest.param(b"\xff\xfe\xfd", id="not-utf8"),
        pytest.param(b'{"prompt": "caf\xe9"}', id="latin1-in-json"),
        pytest.param('{"prompt": "hi"', id="truncated"),
    ],
)
def test_hostile_json_text_is_an_invalid_request(raw: str | bytes) -> None:
    intake = read_request(raw, "task-1", SETTINGS)
    assert isinstance(intake.error, InvalidRequest), intake.error
    assert intake.request_id == "task-1"


@pytest.mark.parametrize(
    "key",
    ["extra_body", "extra_headers", "extra_query", "default_headers", "azure_deployment", "deployment", "provider"],
)
def test_generation_kwargs_that_redirect_the_call_are_refused(key: str) -> None:
    raw = {"request_id": "r-1", "prompt": "hi", "generation_kwargs": {key: {"url": "https://attacker.invalid"}}}
    intake = read_request(raw, "task-1", SETTINGS)
    assert isinstance(intake.error, InvalidRequest), key
    assert key in intake.error.message


def test_read_request_with_an_object_nested_past_the_recursion_limit() -> None:
    raw = {"request_id": "r-1", "prompt": "hi", "metadata": {"a": nested_value(5_000)}}
    intake = read_request(raw, "task-1", SETTINGS)
    assert isinstance(intake.error, REQUEST_FATAL)


# --- the task ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def task_runtime() -> Iterator[tuple[fakeredis.FakeRedis, WorkerRuntime]]:
    client = fakeredis.FakeRedis()
    runtime = build_runtime(SETTINGS, client, worker_name="fuzz/1")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("tasks.chat.get_runtime", lambda: runtime)
        yield client, runtime


@FUZZ
@given(raw=raw_inputs, task_number=st.integers(min_value=0, max_value=10**12))
@example(raw={"request_id": "deep-2", "prompt": "hi", "metadata": {"a": nested_value(300)}}, task_number=1)
@example(raw={"request_id": "surrogate-1", "prompt": "hi", "metadata": {"a": "\ud800"}}, task_number=2)
@example(raw={"request_id": "deep-3", "prompt": "hi", "generation_kwargs": {"x": nested_value(300)}}, task_number=3)
def test_the_task_answers_or_dead_letters_whatever_it_is_given(
    task_runtime: tuple[fakeredis.FakeRedis, WorkerRuntime], raw: Any, task_number: int
) -> None:
    client, runtime = task_runtime
    client.flushall()
    task_id = f"task-{task_number}"
    result = chat.apply(kwargs={"request": raw}, task_id=task_id)
    assert result.successful(), f"the task raised {result.result!r}"
    outcome = result.result
    assert isinstance(outcome, dict)
    if outcome.get("status") == "succeeded":
        reply = ChatReply.model_validate(outcome)
        assert runtime.replies.get(reply.request_id) == reply
        assert client.llen(keys.DEAD_LETTERS) == 0
        return
    assert outcome["status"] == "failed", outcome
    assert outcome["error"]["type"] in {"invalid_request", "request_too_large", "unknown_chain"}, outcome
    letters = [json.loads(entry) for entry in client.lrange(keys.DEAD_LETTERS, 0, -1)]
    assert len(letters) == 1 and letters[0]["reason"] == outcome["error"]["type"]
    reply_to = outcome.get("request_id")
    if reply_to is not None:  # a failed reply and one error event wherever there is an id
        assert_safe_key_part(reply_to)
        stored = runtime.replies.get(reply_to)
        assert stored is not None and stored.status == "failed"
        assert client.xlen(keys.events_stream(reply_to)) == 1
