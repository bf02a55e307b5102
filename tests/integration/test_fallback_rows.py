"""Every row of DESIGN.md's fallback table, end to end: a real worker runs scripted providers
that fail on cue, and a separate subscriber (this process) checks the events and the stored
reply's meta."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tasks.producer.client import CascadeClient
from tests.support.redis_server import RedisServer

from .harness import Outcome, Worker, dead_letters_for, reconstruct_text, run_request
from .scenarios import (
    BACKUP_TEXT,
    CUT_TEXT,
    ERROR_TYPE,
    FATAL_KINDS,
    PRIMARY_TEXT,
    TRANSIENT_KINDS,
)

pytestmark = pytest.mark.integration

SCRIPTED_CLASS = "ScriptedProvider"


def chunks_of(text: str, size: int = 4) -> int:
    return math.ceil(len(text) / size)


def assert_chunks_from(outcome: Outcome, provider: str, attempt: int, text: str) -> None:
    """The chunk events of ``attempt`` come from ``provider`` and spell ``text``."""
    chunks = [e for e in outcome.of_type("chunk") if e.attempt == attempt]
    assert chunks, f"no chunk of attempt {attempt}"
    assert {e.provider for e in chunks} == {provider}
    assert "".join(e.delta or "" for e in chunks) == text


def assert_the_backup_answered(outcome: Outcome, failed: str, *, total_attempts: int) -> None:
    """``failed`` gave up, and the backup (chain index 1) answered in the last attempt."""
    reply = outcome.reply
    assert reply.status == "succeeded", reply.error
    assert [r.content for r in reply.replies] == [BACKUP_TEXT]
    meta = reply.meta
    assert meta.provider == "backup"
    assert meta.successful_chat_generator_index == 1
    assert meta.successful_chat_generator_class == SCRIPTED_CLASS
    assert meta.total_attempts == total_attempts
    assert meta.failed_chat_generators == [failed]
    assert_chunks_from(outcome, "backup", total_attempts, BACKUP_TEXT)
    assert reconstruct_text(outcome.events) == BACKUP_TEXT


def fallback_events(outcome: Outcome) -> list[tuple[str | None, int | None, str | None]]:
    return [(e.provider, e.attempt, e.error_type) for e in outcome.of_type("fallback")]


# --- transient: retry the same provider, then fall through ---------------------------------------


@pytest.mark.parametrize("kind", TRANSIENT_KINDS)
def test_transient_failure_is_retried_and_succeeds_on_the_same_provider(client: CascadeClient, kind: str) -> None:
    provider = f"flaky_{kind}"
    outcome = run_request(client, prompt="hello", chain=f"transient_{kind}")
    reply = outcome.reply

    assert reply.status == "succeeded", reply.error
    assert reply.error is None
    assert [r.content for r in reply.replies] == [PRIMARY_TEXT]
    meta = reply.meta
    assert meta.provider == provider
    assert meta.successful_chat_generator_index == 0
    assert meta.successful_chat_generator_class == SCRIPTED_CLASS
    assert meta.total_attempts == 2
    assert outcome.attempts() == [(provider, "failed", ERROR_TYPE[kind]), (provider, "succeeded", None)]
    assert [(a.attempt, a.index, a.chunks) for a in meta.attempts] == [(1, 0, 0), (2, 0, chunks_of(PRIMARY_TEXT))]
    # The backup provider was never asked.
    assert "backup" not in {a.provider for a in meta.attempts}
    assert meta.failed_chat_generators == []  # as in Haystack, the winner is never listed

    assert outcome.types()[0] == "start"
    assert fallback_events(outcome) == [(provider, 1, ERROR_TYPE[kind])]
    assert_chunks_from(outcome, provider, 2, PRIMARY_TEXT)
    assert reconstruct_text(outcome.events) == PRIMARY_TEXT


@pytest.mark.parametrize("kind", TRANSIENT_KINDS)
def test_transient_failure_that_persists_falls_through_after_max_retries(client: CascadeClient, kind: str) -> None:
    provider = f"always_{kind}"  # max_retries = 2: three calls in all
    outcome = run_request(client, prompt="hello", chain=f"exhaust_{kind}")

    assert_the_backup_answered(outcome, provider, total_attempts=4)
    meta = outcome.reply.meta
    error_type = ERROR_TYPE[kind]
    assert outcome.attempts() == [(provider, "failed", error_type)] * 3 + [("backup", "succeeded", None)]
    assert [a.attempt for a in meta.attempts] == [1, 2, 3, 4]
    assert [a.index for a in meta.attempts] == [0, 0, 0, 1]

    assert fallback_events(outcome) == [(provider, n, error_type) for n in (1, 2, 3)]
    assert {e.attempt for e in outcome.of_type("chunk")} == {4}


def test_rate_limit_with_a_retry_after_beyond_the_limit_falls_through_without_retry(client: CascadeClient) -> None:
    outcome = run_request(client, prompt="hello", chain="retry_after_too_long")

    assert outcome.reply.status == "succeeded"
    assert outcome.attempts() == [("long_retry_after", "failed", "rate_limited"), ("backup", "succeeded", None)]
    assert outcome.reply.meta.failed_chat_generators == ["long_retry_after"]
    assert fallback_events(outcome) == [("long_retry_after", 1, "rate_limited")]
    assert outcome.reply.replies[0].content == BACKUP_TEXT


# --- provider-fatal: fall through at once ----------------------------------------------------------


@pytest.mark.parametrize("kind", FATAL_KINDS)
def test_provider_fatal_failure_falls_through_after_one_attempt(client: CascadeClient, kind: str) -> None:
    provider = f"fatal_{kind}"  # configured with max_retries = 2, which must not be used
    outcome = run_request(client, prompt="hello", chain=f"fatal_{kind}")

    assert_the_backup_answered(outcome, provider, total_attempts=2)
    assert outcome.attempts() == [(provider, "failed", ERROR_TYPE[kind]), ("backup", "succeeded", None)]
    assert outcome.reply.meta.attempts[0].chunks == 0

    assert fallback_events(outcome) == [(provider, 1, ERROR_TYPE[kind])]


# --- request-fatal: no provider is tried ------------------------------------------------------------


def test_unknown_chain_stops_before_any_provider(client: CascadeClient) -> None:
    outcome = run_request(client, prompt="hello", chain="no_such_chain", expect_start=False)
    reply = outcome.reply

    assert outcome.types() == ["error"]
    assert outcome.events[0].error is not None
    assert outcome.events[0].error.type == "unknown_chain"
    assert reply.status == "failed"
    assert reply.error is not None
    assert reply.error.type == "unknown_chain"
    assert "no_such_chain" in reply.error.message
    assert reply.replies == []
    assert reply.meta.attempts == []
    assert reply.meta.total_attempts == 0
    assert reply.meta.provider is None
    assert reply.meta.successful_chat_generator_index is None

    letters = dead_letters_for(client.redis, outcome.request_id)
    assert [entry["reason"] for entry in letters] == ["unknown_chain"]


# --- a failure after chunks were streamed ------------------------------------------------------------


def test_cut_stream_emits_fallback_and_the_next_provider_starts_from_scratch(client: CascadeClient) -> None:
    outcome = run_request(client, prompt="hello", chain="cut")
    reply = outcome.reply
    backup_chunks = chunks_of(BACKUP_TEXT)

    assert outcome.types() == ["start"] + ["chunk"] * 3 + ["fallback"] + ["chunk"] * backup_chunks + ["done"]
    assert_chunks_from(outcome, "cutter", 1, CUT_TEXT[:12])
    assert fallback_events(outcome) == [("cutter", 1, "stream_interrupted")]
    assert_chunks_from(outcome, "backup", 2, BACKUP_TEXT)

    assert reply.status == "succeeded"
    assert reconstruct_text(outcome.events) == reply.replies[0].content == BACKUP_TEXT
    assert outcome.attempts() == [("cutter", "failed", "stream_interrupted"), ("backup", "succeeded", None)]
    assert [a.chunks for a in reply.meta.attempts] == [3, backup_chunks]
    assert reply.meta.failed_chat_generators == ["cutter"]
    assert reply.meta.successful_chat_generator_index == 1
    assert reply.meta.provider == "backup"


def test_stream_without_its_end_marker_is_a_failure_after_chunks(client: CascadeClient) -> None:
    outcome = run_request(client, prompt="hello", chain="no_end_marker")
    primary_chunks = chunks_of(PRIMARY_TEXT)

    # Every chunk of the first provider arrived, but its stream never finished: void it.
    assert_chunks_from(outcome, "no_end_marker", 1, PRIMARY_TEXT)
    assert fallback_events(outcome) == [("no_end_marker", 1, "stream_interrupted")]
    fallback_at = outcome.types().index("fallback")
    assert outcome.types()[1:fallback_at] == ["chunk"] * primary_chunks
    assert reconstruct_text(outcome.events) == outcome.reply.replies[0].content == BACKUP_TEXT
    assert outcome.attempts() == [("no_end_marker", "failed", "stream_interrupted"), ("backup", "succeeded", None)]


# --- every provider failed ------------------------------------------------------------------------------


def test_every_provider_failed_lists_every_attempt(client: CascadeClient) -> None:
    outcome = run_request(client, prompt="hello", chain="all_fail")
    reply = outcome.reply

    assert outcome.types()[-1] == "error"
    assert reply.status == "failed"
    assert reply.replies == []
    assert reply.error is not None
    assert reply.error.type == "all_providers_failed"
    assert outcome.events[-1].error == reply.error
    for provider in ("fatal_auth", "always_server_error", "fatal_context_length"):
        assert provider in reply.error.message

    assert outcome.attempts() == [
        ("fatal_auth", "failed", "auth"),
        ("always_server_error", "failed", "server_error"),
        ("always_server_error", "failed", "server_error"),
        ("always_server_error", "failed", "server_error"),
        ("fatal_context_length", "failed", "context_length"),
    ]
    assert [a.attempt for a in reply.meta.attempts] == [1, 2, 3, 4, 5]
    assert [a.index for a in reply.meta.attempts] == [0, 1, 1, 1, 2]
    meta = reply.meta
    assert meta.total_attempts == 5
    assert meta.failed_chat_generators == ["fatal_auth", "always_server_error", "fatal_context_length"]
    assert meta.successful_chat_generator_index is None
    assert meta.successful_chat_generator_class is None
    assert meta.provider is None
    assert [attempt for _p, attempt, _e in fallback_events(outcome)] == [1, 2, 3, 4, 5]
    assert outcome.of_type("chunk") == []
    # Every provider failing is not bad input: nothing is dead-lettered.
    assert dead_letters_for(client.redis, outcome.request_id) == []


# --- stops: never a reason to fall back ------------------------------------------------------------------


def test_request_deadline_stops_the_request_without_fallback_or_retry(client: CascadeClient) -> None:
    # slow_start needs 3 s for its first chunk; the request allows 0.5 s.
    outcome = run_request(client, prompt="hello", chain="deadline", timeout_s=0.5)
    reply = outcome.reply

    assert outcome.types() == ["start", "error"]
    assert reply.status == "failed"
    assert reply.error is not None
    assert reply.error.type == "deadline_exceeded"
    assert outcome.of_type("fallback") == []
    # One call of slow_start, stopped; not retried, and the backup never asked.
    assert outcome.attempts() == [("slow_start", "stopped", "deadline_exceeded")]
    assert reply.meta.failed_chat_generators == []
    assert reply.meta.provider is None


@pytest.fixture(scope="module")
def limited_client(redis_server: RedisServer, cascade_config: Path, integration_dir: Path) -> Iterator[CascadeClient]:
    """A second worker whose Celery soft time limit (1 s) fires long before any request deadline.

    It uses Redis database 1, so it never takes the session worker's messages (and vice versa).
    """
    url = redis_server.db_url(1)
    worker = Worker(
        redis_url=url,
        config_path=cascade_config,
        log_path=integration_dir / "worker-time-limit.log",
        name="cascade-time-limit",
        concurrency=1,
        env={"CASCADE_SOFT_TIME_LIMIT_S": "1", "CASCADE_TIME_LIMIT_S": "5"},
    ).start()
    try:
        with CascadeClient(url) as producer:
            yield producer
        worker.assert_alive()
    finally:
        worker.stop()


def test_soft_time_limit_stops_the_request_without_fallback(limited_client: CascadeClient) -> None:
    # No timeout_s: the request's deadline is the worker's default (300 s); slow_start needs 3 s.
    outcome = run_request(limited_client, prompt="hello", chain="deadline")
    reply = outcome.reply

    assert outcome.types() == ["start", "error"]
    assert reply.status == "failed"
    assert reply.error is not None
    assert reply.error.type == "time_limit"
    assert outcome.of_type("fallback") == []
    assert [(a.provider, a.outcome) for a in reply.meta.attempts] == [("slow_start", "stopped")]
    assert reply.meta.attempts[0].error_type == "time_limit"
    assert reply.meta.failed_chat_generators == []

    # The worker process survived its soft limit and serves the next request.
    after = run_request(limited_client, prompt="hello", chain="default")
    assert after.reply.status == "succeeded"


def test_a_provider_that_keeps_failing_cools_down_and_is_skipped(client: CascadeClient, rdb: redis.Redis) -> None:
    # Two failures within the window trip the cooldown (state in Redis, shared by all workers).
    for _ in range(2):
        outcome = run_request(client, prompt="hi", chain="cooldown")
        assert outcome.attempts() == [("outage", "failed", "server_error"), ("backup", "succeeded", None)]
    ttl = rdb.pttl("cascade:cooldown:outage")
    assert 0 < ttl <= 30_000

    skipped = run_request(client, prompt="hi", chain="cooldown")
    assert skipped.reply.status == "succeeded"
    assert skipped.attempts() == [("outage", "skipped", "provider_unavailable"), ("backup", "succeeded", None)]
    assert skipped.reply.meta.total_attempts == 1  # a skip is not a call
    assert skipped.reply.meta.successful_chat_generator_index == 1
    assert fallback_events(skipped) == []  # nothing was streamed, nothing to discard
