"""``providers.replies.ReplyAssembler``: text and tool-call fragments per choice, passed on as
chunks and assembled into the replies."""

from __future__ import annotations

from providers.replies import ReplyAssembler
from tasks.contract.schemas import ToolCallDelta, Usage
from tests.support.calls import ChunkCollector


def test_fragments_become_chunks_and_whole_calls() -> None:
    collect = ChunkCollector()
    assembler = ReplyAssembler(collect, "m")

    assembler.text(0, "Let me check. ")
    assembler.tool_call(0, 0, call_id=None, name="get_weather", arguments='{"city":')
    assembler.tool_call(0, 0, call_id="ignored-later", name="ignored", arguments=' "Paris"}')
    assembler.tool_call(0, 0, call_id=None, name=None, arguments="")  # nothing new: no chunk
    assembler.finish(0, "stop")

    (reply,) = assembler.replies(Usage(prompt_tokens=3, completion_tokens=4, total_tokens=7))
    first = collect.chunks[1].tool_call
    assert first is not None and first.id is not None and first.id.startswith("call_")
    assert [chunk.tool_call for chunk in collect.chunks] == [
        None,
        ToolCallDelta(index=0, id=first.id, name="get_weather", arguments_delta='{"city":'),
        ToolCallDelta(index=0, arguments_delta=' "Paris"}'),
    ]
    assert assembler.emitted == 3
    assert reply.content == "Let me check. "
    assert reply.tool_calls is not None and reply.tool_calls[0].id == first.id
    assert reply.tool_calls[0].function.arguments == '{"city": "Paris"}'
    assert reply.meta.finish_reason == "tool_calls"  # a server that says "stop" although it called
    assert reply.meta.usage.total_tokens == 7


def test_choices_keep_their_own_usage_and_finish() -> None:
    assembler = ReplyAssembler(ChunkCollector(), "m")
    assembler.choice(1)
    assembler.text(0, "a")
    assembler.finish(0, "eos_token")
    assembler.finish(1, "max_tokens")
    assembler.usage(1, Usage(prompt_tokens=1, completion_tokens=0, total_tokens=1))

    first, second = assembler.replies(Usage(prompt_tokens=5, completion_tokens=5, total_tokens=10))

    assert (first.content, first.meta.finish_reason, first.meta.usage.total_tokens) == ("a", "stop", 10)
    assert (second.content, second.tool_calls, second.meta.finish_reason) == ("", None, "length")
    assert second.meta.usage.total_tokens == 1
