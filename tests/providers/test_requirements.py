"""``providers.requirements``: what a call needs of a provider, and the check of its answers."""

from __future__ import annotations

import pytest

from providers import errors
from providers.base import ProviderCall
from providers.requirements import Needs, OutputCheck, needs_of
from settings.providers import Capabilities
from tasks.contract.schemas import AssistantReply, ChatMessage, FunctionCall, ReplyMeta, ResponseFormat, ToolCall

SCHEMA_FORMAT = ResponseFormat.model_validate(
    {"type": "json_schema", "json_schema": {"name": "n", "schema": {"type": "object", "required": ["n"]}}}
)


def reply(content: str | None, index: int = 0, calls: bool = False) -> AssistantReply:
    tool_calls = [ToolCall(id="c", function=FunctionCall(name="f", arguments="{}"))] if calls else None
    return AssistantReply(content=content, tool_calls=tool_calls, meta=ReplyMeta(model="m", index=index))


def test_needs_of_a_plain_call_is_nothing() -> None:
    call = ProviderCall(
        messages=[ChatMessage(role="user", content="hi")], generation_kwargs={"n": 1}, stream=True, deadline=0
    )
    assert needs_of(call) == Needs()
    assert Needs(tools=True, n=True).missing(Capabilities(tools=False, images=True, json_schema=True, n=False)) == [
        "tools",
        "n > 1",
    ]


def test_json_object_needs_no_capability_but_is_checked() -> None:
    call = ProviderCall(
        messages=[ChatMessage(role="user", content="hi")],
        generation_kwargs={"response_format": {"type": "json_object"}},
        stream=True,
        deadline=0,
    )
    assert needs_of(call) == Needs()
    check = OutputCheck(call.response_format)
    check.check("p", [reply('{"a": 1}')])
    with pytest.raises(errors.InvalidOutput, match="a JSON list, not an object"):
        check.check("p", [reply("[1]")])


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("", "not JSON"),
        ("[" * 100_000, "not JSON"),  # deeper than the parser goes: no crash
        ('{"m": 1}', "'n' is a required property"),
    ],
)
def test_schema_check_names_the_problem(text: str, problem: str) -> None:
    with pytest.raises(errors.InvalidOutput) as caught:
        OutputCheck(SCHEMA_FORMAT).check("p", [reply('{"n": 1}'), reply(text, index=1)])
    assert caught.value.message.startswith("p: reply 1 is not valid json_schema: ")
    assert problem in caught.value.message


def test_a_reply_calling_tools_and_a_text_format_are_not_checked() -> None:
    OutputCheck(SCHEMA_FORMAT).check("p", [reply(None, calls=True)])
    OutputCheck(ResponseFormat(type="text")).check("p", [reply("prose")])
    OutputCheck(None).check("p", [reply("prose")])
