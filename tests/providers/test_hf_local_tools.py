"""``hf_local`` with tools, on tiny models built in fixtures.

* The chat template (a Hermes-style one, ``TOOLS_CHAT_TEMPLATE``) receives the request's tools,
  and past tool calls and tool results.
* A whole run of the provider, one at a time and batched, on a model that writes a fixed
  tool-call answer: ``build_scripted_model`` sets a tiny Llama's weights so that greedy decoding
  emits that text token by token through transformers' own ``generate`` and continuous
  batching (nothing is patched; the random tiny model never writes a call by chance).
* A model whose template takes no tools is a provider without tools: skipped by the chain
  (``skipped``, ``unsupported``), also through a worker's provider pool.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from providers import errors
from providers.base import ProviderCall
from providers.chain import ChainRun
from providers.huggingface.local import HfLocalProvider
from providers.registry import ProviderPool, build_provider
from settings.providers import HfLocalConfig, ScriptedConfig
from tasks.contract.schemas import ChatMessage, ToolDefinition
from tests.support import calls
from tests.support.tiny_model import TOOLS_CHAT_TEMPLATE, build_scripted_model, build_tiny_model

WEATHER_TOOL = ToolDefinition.model_validate(
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city.",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
)
ASK = [ChatMessage(role="system", content="Be brief."), ChatMessage(role="user", content="Weather in Paris?")]
ANSWER = [
    "Checking",
    " the weather.",
    "<tool_call>",
    '{"name": "get_weather",',
    ' "arguments": {"city": "Paris"}}',
    "</tool_call>",
]
BATCHED: dict[str, Any] = {"max_batch_size": 2, "kv_block_size": 32, "max_tokens_per_request": 256}


def tool_call(messages: list[ChatMessage] = ASK, **fields: Any) -> ProviderCall:
    return dataclasses.replace(calls.make_call(messages=messages, deadline_s=60.0), tools=[WEATHER_TOOL], **fields)


@pytest.fixture(scope="module")
def tools_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-tools"), chat_template=TOOLS_CHAT_TEMPLATE)


@pytest.fixture(scope="module")
def plain_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-plain"))


@pytest.fixture(scope="module")
def caller_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_scripted_model(tmp_path_factory.mktemp("tiny-caller"), ANSWER)


@pytest.fixture(scope="module")
def caller(caller_model: Path) -> HfLocalProvider:
    alone = HfLocalProvider("caller", HfLocalConfig(model=str(caller_model), device="cpu", max_new_tokens=16))
    alone.warm_up()
    return alone


@pytest.fixture(scope="module")
def batched_caller(caller_model: Path) -> Iterator[HfLocalProvider]:
    shared = HfLocalProvider(
        "batched", HfLocalConfig(model=str(caller_model), device="cpu", max_new_tokens=16, **BATCHED)
    )
    shared.warm_up()
    yield shared
    assert shared._engine is not None
    shared._engine.close()


def test_the_template_receives_the_tools(tools_model: Path) -> None:
    provider = HfLocalProvider("tools", HfLocalConfig(model=str(tools_model), device="cpu"))

    prompt = provider.render_prompt(tool_call())

    schema = json.dumps(WEATHER_TOOL.model_dump(mode="json", exclude_none=True))
    assert schema in prompt
    assert "<tools>" not in provider.render_prompt(tool_call(tool_choice="none"))
    assert provider.config.supports_tools is True and provider.tool_call_format == "hermes"


def test_past_calls_and_tool_results_are_rendered_as_the_template_expects(tools_model: Path) -> None:
    provider = HfLocalProvider("tools", HfLocalConfig(model=str(tools_model), device="cpu"))
    assistant = ChatMessage.model_validate(
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        }
    )
    result = ChatMessage(role="tool", tool_call_id="call_1", content="18 C and sunny")

    prompt = provider.render_prompt(tool_call([*ASK, assistant, result]))

    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in prompt
    assert "<tool_response>\n18 C and sunny\n</tool_response>" in prompt
    assert "None" not in prompt


def check_tool_call_reply(collect: calls.ChunkCollector, replies: list[Any]) -> None:
    texts = [chunk.content for chunk in collect.chunks if chunk.tool_call is None]
    fragments = [chunk.tool_call for chunk in collect.chunks if chunk.tool_call is not None]
    assert "".join(texts) == "Checking the weather."
    assert not any("tool_call" in text or "get_weather" in text for text in texts)
    assert len(fragments) == 1 and collect.chunks[-1].tool_call is fragments[0]
    fragment = fragments[0]
    assert fragment.index == 0 and fragment.id and fragment.name == "get_weather"
    assert json.loads(fragment.arguments_delta) == {"city": "Paris"}
    [reply] = replies
    assert reply.content == "Checking the weather."
    assert reply.tool_calls is not None and len(reply.tool_calls) == 1
    assert reply.tool_calls[0].id == fragment.id
    assert (reply.tool_calls[0].function.name, reply.tool_calls[0].function.arguments) == (
        "get_weather",
        fragment.arguments_delta,
    )
    assert reply.meta.finish_reason == "tool_calls"
    assert reply.meta.usage.completion_tokens == len(ANSWER) + 1  # the pieces and EOS


def test_a_generated_tool_call_is_streamed_as_a_call_one_at_a_time(caller: HfLocalProvider) -> None:
    collect = calls.ChunkCollector()
    check_tool_call_reply(collect, caller.run(tool_call(), collect))


def test_a_generated_tool_call_is_streamed_as_a_call_in_the_batch(batched_caller: HfLocalProvider) -> None:
    collect = calls.ChunkCollector()
    check_tool_call_reply(collect, batched_caller.run(tool_call(), collect))


@pytest.mark.parametrize("fixture", ["caller", "batched_caller"])
def test_without_tools_offered_the_answer_is_text(fixture: str, request: pytest.FixtureRequest) -> None:
    provider: HfLocalProvider = request.getfixturevalue(fixture)
    collect = calls.ChunkCollector()

    [reply] = provider.run(tool_call(tool_choice="none"), collect)

    assert reply.content == collect.text == "".join(ANSWER)
    assert reply.tool_calls is None and reply.meta.finish_reason == "stop"


def test_a_model_whose_template_takes_no_tools_is_skipped_by_the_chain(plain_model: Path) -> None:
    plain = HfLocalProvider("plain", HfLocalConfig(model=str(plain_model), device="cpu", max_new_tokens=8))
    assert plain.config.capabilities().tools, "before the model is loaded, the type's default holds"
    plain.warm_up()
    assert plain.config.supports_tools is False
    scripted = build_provider("scripted", ScriptedConfig(text="Sunny."))
    listener = calls.ChainRecorder()
    run = ChainRun(
        providers=[plain, scripted],
        messages=ASK,
        generation_kwargs={},
        deadline=time.monotonic() + 30,
        listener=listener,
        tools=[WEATHER_TOOL],
    )

    outcome = run.execute()

    assert outcome.succeeded_index == 1
    assert [(r.provider, r.outcome, r.error_type) for r in run.attempts] == [
        ("plain", "skipped", "unsupported"),
        ("scripted", "succeeded", None),
    ]
    assert not listener.failed


def test_a_worker_pool_shows_the_loaded_models_capability(plain_model: Path) -> None:
    pool = ProviderPool({"plain": HfLocalConfig(model=str(plain_model), device="cpu")})
    [handle] = pool.chain(["plain"])
    assert handle.config.capabilities().tools and pool.built("plain") is None, "nothing is loaded to answer that"

    handle.warm_up()

    assert handle.config.capabilities().tools is False


def test_a_call_with_tools_reaching_a_model_without_them_is_unsupported(plain_model: Path) -> None:
    cold = HfLocalProvider("cold", HfLocalConfig(model=str(plain_model), device="cpu", max_new_tokens=8))
    with pytest.raises(errors.Unsupported):
        cold.run(tool_call(), lambda _: None)
    [reply] = cold.run(calls.make_call(messages=ASK), lambda _: None)
    assert reply.tool_calls is None


def test_the_entrys_word_wins_over_the_template(plain_model: Path, tools_model: Path) -> None:
    told = HfLocalProvider("told", HfLocalConfig(model=str(tools_model), device="cpu", supports_tools=False))
    told.warm_up()
    assert told.config.capabilities().tools is False
    forced = HfLocalProvider(
        "forced", HfLocalConfig(model=str(plain_model), device="cpu", supports_tools=True, tool_call_format="json")
    )
    forced.warm_up()
    assert forced.config.capabilities().tools is True and forced.tool_call_format == "json"
