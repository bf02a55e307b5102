"""Redis lost for a moment by one running request, on a real redis-server: the request's write
fails (its connection is gone), and Redis answers again before the run has ended.

The run must not end the request on its own (a ``failed`` reply for an outage of the
infrastructure, or a stream with a hole in its ``seq``), and must not drop its in-flight record
(then nothing would ever send the request again): it stops, its lease lapses, and a reaper sends
it again; the rerun continues the stream (``worker_lost``) and answers. The task runs in this
process (``apply``), with a client that loses its connection exactly where the test says.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import redis

from settings import ScriptedConfig, Settings
from tasks.chat import chat
from tasks.contract.keys import INFLIGHT_SET, inflight_record, lease_key
from worker.demo.local import LocalRedis
from worker.runtime import WorkerRuntime, build_runtime
from worker.state.reaper import reclaim_expired

from .harness import assert_coherent, new_id, stored_events, stored_reply, wait_until

pytestmark = pytest.mark.faults

TEXT = "One, two, three, four, five, six."
LEASE_TTL_S = 0.5


class BlinkingRedis(redis.Redis):
    """A client whose connection is lost (``ConnectionError``) where a test says: when it writes
    the request's n-th ``chunk`` event, or the script that stores a request's reply."""

    fail_at_chunk: int | None = None
    fail_reply_of: str | None = None
    chunks_written = 0

    def evalsha(self, sha: str, numkeys: int, *keys_and_args: Any) -> Any:  # type: ignore[override]
        # Every script is sent by its SHA first (worker.state.lua), by its text when Redis does
        # not know it yet; each blink happens once, on whichever comes first.
        if self._blink_at_reply(keys_and_args):
            return super().evalsha(sha, numkeys, *keys_and_args)
        # Events are written by one script each round trip (worker.state.publisher), its events last.
        counted = self._blink_at_chunk(keys_and_args[numkeys:])
        try:
            return super().evalsha(sha, numkeys, *keys_and_args)
        except redis.exceptions.NoScriptError:
            self.chunks_written -= counted  # not run: the script's text is sent next
            raise

    def _blink_at_reply(self, keys_and_args: tuple[Any, ...]) -> bool:
        """True for the script storing the reply (the one whose first key is the reply), which
        loses the connection if the test says so."""
        if "cascade:reply:" not in str(keys_and_args[0]):
            return False
        if self.fail_reply_of is not None and keys_and_args[0] == f"cascade:reply:{self.fail_reply_of}":
            self.fail_reply_of = None
            raise redis.ConnectionError("Connection closed by server. (injected)")
        return True

    def _blink_at_chunk(self, args: tuple[Any, ...]) -> int:
        chunks = sum(isinstance(arg, str) and '"type":"chunk"' in arg for arg in args)
        if chunks and self.fail_at_chunk is not None and self.chunks_written + chunks >= self.fail_at_chunk:
            self.fail_at_chunk = None
            raise redis.ConnectionError("Connection closed by server. (injected)")
        self.chunks_written += chunks
        return chunks

    def eval(self, script: Any, numkeys: int, *keys_and_args: Any) -> Any:  # type: ignore[override]
        if not self._blink_at_reply(keys_and_args):
            self._blink_at_chunk(keys_and_args[numkeys:])
        return super().eval(script, numkeys, *keys_and_args)


@pytest.fixture
def blinking(server: LocalRedis, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[BlinkingRedis, WorkerRuntime]]:
    settings = Settings(
        providers={"steady": ScriptedConfig(text=TEXT, chunk_size=4)},
        chains={"default": ["steady"]},
        lease_ttl_s=LEASE_TTL_S,
        coalesce_ms=0,  # every chunk its own write, so the n-th one can be the one that fails
    )
    client = BlinkingRedis.from_url(server.url)
    runtime = build_runtime(settings, client, worker_name="blips/1")
    monkeypatch.setattr("tasks.chat.get_runtime", lambda: runtime)
    try:
        yield client, runtime
    finally:
        client.close()


def run_then_resend(client: BlinkingRedis, request_id: str) -> None:
    """Run the request once (its connection blinks), then do what a surviving worker does: its
    reaper resends the request once the lease lapsed, and the resent message runs."""
    first = chat.apply(kwargs={"request": {"request_id": request_id, "prompt": "count"}}, task_id=request_id)
    assert first.failed(), f"the run cut off from Redis must not end the request itself: {first.result}"
    assert stored_reply(client, request_id) is None
    assert client.exists(inflight_record(request_id)), "the in-flight record is kept"

    resent: list[dict[str, Any]] = []

    def reap() -> bool:
        reclaim_expired(client, lambda _queue, kwargs, _task: resent.append(kwargs))
        return bool(resent)

    wait_until(reap, timeout_s=10 * LEASE_TTL_S, what="the reaper resends the request")
    assert resent[0]["request"]["request_id"] == request_id
    chat.apply(kwargs=resent[0], task_id=new_id("resent")).get(disable_sync_subtasks=False)


def assert_resumed(client: BlinkingRedis, request_id: str) -> None:
    events = stored_events(client, request_id)
    reply = assert_coherent(events, stored_reply(client, request_id), request_id)
    assert reply.status == "succeeded" and reply.replies[0].content == TEXT
    assert [(e.attempt, e.error_type) for e in events if e.type == "fallback"] == [(1, "worker_lost")]
    assert client.exists(lease_key(request_id), inflight_record(request_id)) == 0
    assert client.zscore(INFLIGHT_SET, request_id) is None


def test_redis_lost_mid_stream_and_back_before_the_run_ends(blinking: tuple[BlinkingRedis, WorkerRuntime]) -> None:
    client, _runtime = blinking
    request_id = new_id("blip-stream")
    client.fail_at_chunk = 2  # the first chunk is written, the second one's write is lost
    run_then_resend(client, request_id)
    assert_resumed(client, request_id)


def test_redis_lost_at_the_reply_and_back_for_the_release(blinking: tuple[BlinkingRedis, WorkerRuntime]) -> None:
    client, _runtime = blinking
    request_id = new_id("blip-finish")
    client.fail_reply_of = request_id
    run_then_resend(client, request_id)
    assert_resumed(client, request_id)
