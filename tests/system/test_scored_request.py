"""A scored chat request end to end: a real worker and redis-server, an OpenAI provider against
a fake server on 127.0.0.1 that streams the answer, then answers each decision prompt by a
rule (ANSWER while the prompt still names the book, REFUSE once masking hid it). The reply's
meta carries Haystack's three keys with the numbers the EDFL formulas give for that tally,
the decision calls are counted, and none of them reaches the events."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from providers.scoring import HallucinationScoreConfig, build_skeletons, score_decisions
from tasks.producer.client import CascadeClient
from tests.providers.openai_wire import chat_completion, chat_stream, error_reply
from tests.support.fake_http import FakeHTTPServer, Received, Reply
from tests.support.stack import local_stack
from tests.support.stream_contract import assert_coherent, reconstruct_text

pytestmark = pytest.mark.integration

BOOK = '"The Old Man and the Sea"'
PROMPT = f"Who wrote {BOOK} in 1952?"
ANSWER = "Ernest Hemingway wrote it."
FAIL_MARK = "(no scoring today)"
CONFIG = """
[providers.steady]
type = "scripted"
text = "ready"

[providers.gpt]
type = "openai"
model = "gpt-4.1-mini"
api_base_url = "{openai}/v1"
max_retries = 0
timeout_s = 10

[chains]
default = ["steady"]
scored = ["gpt"]
"""


def decide(received: Received) -> Reply:
    """The fake model: streams the answer, and decides by whether the prompt names the book."""
    body = received.body
    if body.get("stream"):
        return Reply(events=chat_stream("Ernest ", "Hemingway ", "wrote it."))
    prompt = body["messages"][-1]["content"]
    if FAIL_MARK in prompt:
        return error_reply(500, "The server had an error while processing your request.", "server_error")
    return Reply(json_body=chat_completion("ANSWER" if BOOK in prompt else "REFUSE"))


@dataclass
class Stack:
    url: str
    openai: FakeHTTPServer


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("scored")
    with FakeHTTPServer() as openai:
        openai.responder = decide
        with local_stack(workdir, CONFIG.format(openai=openai.url), extra_env={"OPENAI_API_KEY": "sk-test-0"}) as local:
            yield Stack(local.url, openai)


def test_a_scored_request_carries_the_three_keys_with_the_paper_s_numbers(stack: Stack) -> None:
    option = {"n_samples": 3, "m": 4, "skeleton_policy": "closed_book", "temperature": 0.5}
    with CascadeClient(stack.url) as client:
        request_id = client.submit(prompt=PROMPT, chain="scored", hallucination_score=option)
        events = list(client.events(request_id, timeout_s=60))
        reply = client.reply(request_id)
    assert_coherent(events, reply, request_id)
    assert reply is not None and reply.status == "succeeded"
    assert reply.replies[0].content == ANSWER == reconstruct_text(events)
    meta = reply.replies[0].meta
    assert meta.hallucination_error is None
    decisions = [r for r in stack.openai.received if r.body and not r.body.get("stream")]
    assert meta.hallucination_scoring_calls == 3 * (4 + 1) == len(decisions)
    assert meta.hallucination_scoring_usage is not None and meta.hallucination_scoring_usage.total_tokens == 15 * 15
    assert all(r.body["temperature"] == 0.5 for r in decisions)
    # The same numbers as the formulas give for the tally the fake model's rule makes.
    config = HallucinationScoreConfig(**option)
    skeletons = build_skeletons(PROMPT, 4, "closed_book")
    tally = [["answer" if BOOK in skeleton else "refuse"] * 3 for skeleton in skeletons.prompts]
    expected = score_decisions(["answer"] * 3, tally, config)
    assert (meta.hallucination_decision, meta.hallucination_risk, meta.hallucination_rationale) == (
        expected.decision,
        expected.risk,
        expected.rationale,
    )
    # No decision reached a subscriber: the chunks are the answer's, and nothing else says ANSWER/REFUSE.
    before_done = "".join(e.model_dump_json() for e in events if e.type != "done")
    assert "REFUSE" not in before_done and "ANSWER" not in before_done


def test_scoring_that_fails_leaves_the_answer_standing(stack: Stack) -> None:
    with CascadeClient(stack.url) as client:
        request_id = client.submit(
            prompt=f"{PROMPT} {FAIL_MARK}", chain="scored", hallucination_score={"n_samples": 1, "m": 1}
        )
        events = list(client.events(request_id, timeout_s=60))
        reply = client.reply(request_id)
    assert_coherent(events, reply, request_id)
    assert reply is not None and reply.status == "succeeded" and reply.replies[0].content == ANSWER
    meta = reply.replies[0].meta
    assert meta.hallucination_error == "a decision call failed: server_error"
    assert meta.hallucination_decision is None and meta.hallucination_risk is None
