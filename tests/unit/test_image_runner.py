"""The ``cascade.image`` run (tasks/image_runner.py on tasks/run.py) over fakeredis: images stored
and announced as they are ready, partial images at their own keys, the chain's retries and
fall-through for image providers, the worker's size bound, cancel, idempotency, lease take-over,
hand-off and the records a reaper resends from."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import fakeredis
import pytest

from providers import errors, registry
from providers.base import ChatProvider
from providers.images import GeneratedImageData, ImageCall, ImageProvider, OnImage, UnsupportedParameter
from settings import ProviderConfigBase, Settings
from settings.providers import OpenAIImageConfig
from tasks.contract import keys
from tasks.contract.images import ImageReply, ImageRequest
from tasks.contract.schemas import HandOff, StreamEvent
from tasks.image_runner import ImageRunner
from tasks.run import TaskContext
from tests.providers.images_wire import jpeg, png
from worker.runtime import WorkerRuntime, build_runtime
from worker.state.lease import LeaseLost
from worker.state.pending import task_of

RID = "img-1"
Step = Callable[[ImageCall, OnImage], list[GeneratedImageData]]


def image(index: int, data: bytes, *, partial: int | None = None, revised: str | None = None) -> GeneratedImageData:
    mime = "image/jpeg" if data.startswith(b"\xff\xd8") else "image/png"
    return GeneratedImageData(
        index=index,
        data=data,
        mime_type=mime,
        model="dall-e-3",
        revised_prompt=revised,
        partial=partial is not None,
        partial_index=partial,
    )


def makes(*images: GeneratedImageData, then: errors.ProviderError | None = None) -> Step:
    """A call that passes ``images`` to ``on_image`` one by one, then fails with ``then`` (if
    given) or returns the finished ones."""

    def step(call: ImageCall, on_image: OnImage) -> list[GeneratedImageData]:
        for made in images:
            on_image(made)
        if then is not None:
            raise then
        return [made for made in images if not made.partial]

    return step


def fails(error: errors.ProviderError) -> Step:
    return makes(then=error)


class Painter(ImageProvider):
    """An image provider that plays ``steps`` in turn (the last one again once they run out)."""

    def __init__(self, provider_id: str, config: ProviderConfigBase, steps: list[Step]) -> None:
        super().__init__(provider_id, config)
        self.steps = steps
        self.calls: list[ImageCall] = []

    def run(self, call: ImageCall, on_image: OnImage) -> list[GeneratedImageData]:
        self.calls.append(call)
        step = self.steps[min(len(self.calls), len(self.steps)) - 1]
        return step(call, on_image)


class Painters:
    """The painters of a test: their steps by provider id (``script``), and each one built."""

    def __init__(self) -> None:
        self.steps: dict[str, list[Step]] = {}
        self.built: dict[str, Painter] = {}

    def script(self, provider_id: str, *steps: Step) -> None:
        self.steps[provider_id] = list(steps)

    def __getitem__(self, provider_id: str) -> Painter:
        return self.built[provider_id]


@pytest.fixture
def painters(monkeypatch: pytest.MonkeyPatch) -> Painters:
    """Painters built in place of the configured providers they have steps for."""
    found = Painters()
    real_build = registry.build_provider

    def build(provider_id: str, config: ProviderConfigBase) -> ChatProvider:
        steps = found.steps.get(provider_id)
        if steps is None:
            return real_build(provider_id, config)
        found.built[provider_id] = Painter(provider_id, config, steps)
        return found.built[provider_id]  # type: ignore[return-value]

    monkeypatch.setattr(registry, "build_provider", build)
    return found


def runtime_for(client: fakeredis.FakeRedis, chain: list[str], **fields: Any) -> WorkerRuntime:
    entries = {
        "first": OpenAIImageConfig(model="dall-e-3", max_retries=1, backoff_initial_s=0.01),
        "second": OpenAIImageConfig(model="gpt-image-1", max_retries=0),
        "elsewhere": OpenAIImageConfig(model="dall-e-3", queue="images.slow"),
    }
    settings = Settings(
        providers={pid: entries[pid] for pid in chain}, chains={"images": chain}, coalesce_ms=0, **fields
    )
    return build_runtime(settings, client, worker_name="unit-worker")


def context() -> TaskContext:
    return TaskContext(
        task_id=RID, queue="chat", submitted_at=time.time(), started_at_wall=time.time(), started_at=time.monotonic()
    )


def run_image(runtime: WorkerRuntime, **fields: Any) -> ImageReply:
    request = ImageRequest.model_validate({"request_id": RID, "prompt": "a lighthouse", **fields})
    reply = ImageRunner(runtime, request, context()).run()
    assert isinstance(reply, ImageReply)
    return reply


def events(client: fakeredis.FakeRedis) -> list[StreamEvent]:
    entries = client.xrange(keys.events_stream(RID))
    return [StreamEvent.model_validate_json(fields[b"event"]) for _id, fields in entries]


def assert_well_formed(stream: list[StreamEvent]) -> None:
    assert [e.seq for e in stream] == list(range(len(stream)))
    assert stream[0].type == "start"
    assert [e.is_terminal for e in stream].count(True) == 1 and stream[-1].is_terminal


def test_images_are_stored_then_announced_and_the_reply_lists_them(
    fake_redis: fakeredis.FakeRedis, painters: Painters
) -> None:
    painters.script("first", makes(image(0, png(80), revised="a lighthouse, at dusk"), image(1, jpeg(60))))
    runtime = runtime_for(fake_redis, ["first"])
    reply = run_image(runtime, n=2, metadata={"order": "o-1"})
    stream = events(fake_redis)
    assert_well_formed(stream)
    assert [e.type for e in stream] == ["start", "image", "image", "done"]
    assert stream[0].chain == "images"
    announced = [(e.index, e.key, e.partial, e.provider, e.attempt) for e in stream if e.type == "image"]
    assert announced == [(0, keys.image_key(RID, 0), None, "first", 1), (1, keys.image_key(RID, 1), None, "first", 1)]
    assert fake_redis.get(keys.image_key(RID, 0)) == png(80)
    assert fake_redis.get(keys.image_key(RID, 1)) == jpeg(60)
    # The bytes outlive the reply: its TTL, counted from the run's deadline.
    reply_ttl = fake_redis.ttl(keys.reply_key(RID))
    assert reply_ttl > 0 and fake_redis.ttl(keys.image_key(RID, 0)) > reply_ttl
    assert reply.status == "succeeded" and reply.error is None and reply.metadata == {"order": "o-1"}
    assert [(i.key, i.mime_type, i.bytes, i.revised_prompt) for i in reply.images] == [
        (keys.image_key(RID, 0), "image/png", 80, "a lighthouse, at dusk"),
        (keys.image_key(RID, 1), "image/jpeg", 60, None),
    ]
    assert reply.meta.provider == "first" and reply.meta.chain == "images"
    assert reply.meta.successful_chat_generator_index == 0
    assert reply.meta.successful_chat_generator_class == "OpenAIImageProvider"
    assert reply.meta.total_attempts == 1 and reply.meta.attempts[0].chunks == 2
    assert reply.meta.timings.ttft_ms is not None
    assert runtime.replies.get(RID) == reply == stream[-1].reply
    call = painters["first"].calls[0]
    assert (call.prompt, call.n, call.provider_attempt) == ("a lighthouse", 2, 1)


def test_partial_images_go_to_their_own_keys_and_never_where_the_final_one_belongs(
    fake_redis: fakeredis.FakeRedis, painters: Painters
) -> None:
    painters.script(
        "first", makes(image(0, png(20, b"a"), partial=0), image(0, png(20, b"b"), partial=1), image(0, png(30)))
    )
    reply = run_image(runtime_for(fake_redis, ["first"]))
    found = [(e.key, e.partial) for e in events(fake_redis) if e.type == "image"]
    assert found == [
        (keys.partial_image_key(RID, 0, 0), True),
        (keys.partial_image_key(RID, 0, 1), True),
        (keys.image_key(RID, 0), None),
    ]
    assert fake_redis.get(keys.partial_image_key(RID, 0, 1)) == png(20, b"b")
    assert fake_redis.get(keys.image_key(RID, 0)) == png(30)
    assert [i.key for i in reply.images] == [keys.image_key(RID, 0)]


def test_an_attempt_that_fails_after_an_image_went_out_falls_back_and_its_key_is_taken_over(
    fake_redis: fakeredis.FakeRedis, painters: Painters
) -> None:
    painters.script("first", makes(image(0, png(40, b"x")), then=errors.ServerError("first: 500 mid-way")))
    painters.script("second", makes(image(0, png(50, b"y"))))
    reply = run_image(runtime_for(fake_redis, ["first", "second"]))
    stream = events(fake_redis)
    assert_well_formed(stream)
    assert [e.type for e in stream] == ["start", "image", "fallback", "image", "done"]
    fallback = stream[2]
    assert (fallback.provider, fallback.attempt, fallback.error_type) == ("first", 1, "stream_interrupted")
    assert len(painters["first"].calls) == 1, "never retried once an image went out"
    assert fake_redis.get(keys.image_key(RID, 0)) == png(50, b"y")
    assert reply.status == "succeeded" and reply.meta.provider == "second"
    assert reply.meta.failed_chat_generators == ["first"]


def test_a_transient_error_is_retried_and_a_content_policy_refusal_falls_through_at_once(
    fake_redis: fakeredis.FakeRedis, painters: Painters
) -> None:
    painters.script("first", fails(errors.ServerError("first: 500")))
    painters.script("second", makes(image(0, png(50))))
    reply = run_image(runtime_for(fake_redis, ["first", "second"]))
    assert [(a.provider, a.outcome, a.error_type) for a in reply.meta.attempts] == [
        ("first", "failed", "server_error"),
        ("first", "failed", "server_error"),
        ("second", "succeeded", None),
    ]
    assert [call.provider_attempt for call in painters["first"].calls] == [1, 2]

    fake_redis.flushall()
    painters.script("first", fails(errors.ContentFiltered("first: content_policy_violation")))
    reply = run_image(runtime_for(fake_redis, ["first", "second"]))
    assert [(a.provider, a.error_type) for a in reply.meta.attempts] == [("first", "content_filter"), ("second", None)]
    assert reply.status == "succeeded"


def test_a_parameter_every_provider_refuses_fails_the_request_naming_the_field(
    fake_redis: fakeredis.FakeRedis, painters: Painters
) -> None:
    painters.script("first", fails(UnsupportedParameter("first: size: '512x512' is not one dall-e-3 takes", "size")))
    painters.script(
        "second", fails(UnsupportedParameter("second: size: '512x512' is not one gpt-image-1 takes", "size"))
    )
    reply = run_image(runtime_for(fake_redis, ["first", "second"]), size="512x512")
    assert reply.status == "failed" and reply.images == []
    assert reply.error is not None and reply.error.type == "all_providers_failed"
    assert "size: '512x512' is not one dall-e-3 takes" in reply.error.message
    assert "second: size:" in reply.error.message
    assert len(painters["first"].calls) == 1, "a refusal is not retried"
    assert events(fake_redis)[-1].type == "error"
    assert fake_redis.llen(keys.DEAD_LETTERS) == 0, "a valid request the providers refuse is no dead letter"


def test_an_image_over_the_workers_bound_fails_its_attempt(fake_redis: fakeredis.FakeRedis, painters: Painters) -> None:
    painters.script("first", makes(image(0, png(500))))
    painters.script("second", makes(image(0, png(100))))
    reply = run_image(runtime_for(fake_redis, ["first", "second"], max_image_bytes=200))
    assert [(a.provider, a.error_type) for a in reply.meta.attempts] == [("first", "bad_request"), ("second", None)]
    assert "over max_image_bytes 200" in (reply.meta.attempts[0].error_message or "")
    assert fake_redis.get(keys.image_key(RID, 0)) == png(100)
    assert runtime_for(fake_redis, ["first"], max_image_bytes=200).settings.image_bytes_limit("first") == 200


def test_a_cancel_stops_the_run_at_the_next_image(fake_redis: fakeredis.FakeRedis, painters: Painters) -> None:
    def cancel_then_paint(call: ImageCall, on_image: OnImage) -> list[GeneratedImageData]:
        fake_redis.set(keys.cancel_key(RID), 1)
        on_image(image(0, png(30)))
        return []

    painters.script("first", cancel_then_paint)
    reply = run_image(runtime_for(fake_redis, ["first"]))
    assert reply.status == "cancelled" and reply.images == []
    assert [e.type for e in events(fake_redis)][-1] == "cancelled"


def test_a_request_answered_already_is_not_run_again(fake_redis: fakeredis.FakeRedis, painters: Painters) -> None:
    painters.script("first", makes(image(0, png(30))))
    runtime = runtime_for(fake_redis, ["first"])
    first = run_image(runtime)
    again = run_image(runtime)
    assert again == first and len(painters["first"].calls) == 1


def test_a_run_taken_over_stores_no_image(fake_redis: fakeredis.FakeRedis, painters: Painters) -> None:
    def taken_over(call: ImageCall, on_image: OnImage) -> list[GeneratedImageData]:
        fake_redis.set(keys.lease_key(RID), "another-worker")
        on_image(image(0, png(30)))
        return []

    painters.script("first", taken_over)
    request = ImageRequest(request_id=RID, prompt="a lighthouse")
    with pytest.raises(LeaseLost):
        ImageRunner(runtime_for(fake_redis, ["first"]), request, context()).run()
    assert not fake_redis.exists(keys.image_key(RID, 0))
    assert not fake_redis.exists(keys.reply_key(RID))


class Sender:
    def __init__(self) -> None:
        self.sent: list[tuple[str, dict[str, Any], str]] = []

    def send(self, queue: str, kwargs: dict[str, Any], request_id: str | None = None, *, task: str = "") -> None:
        self.sent.append((queue, kwargs, task))


def test_the_run_records_and_hands_off_as_cascade_image(fake_redis: fakeredis.FakeRedis, painters: Painters) -> None:
    painters.script("first", fails(errors.ContentFiltered("first: refused")))
    runtime = runtime_for(fake_redis, ["first", "elsewhere"])
    sender = Sender()
    request = ImageRequest(request_id=RID, prompt="a lighthouse")
    ctx = context()
    ctx.local_queues = frozenset({"chat"})
    state = ImageRunner(runtime, request, ctx, sender=sender).run()
    assert isinstance(state, HandOff) and state.start_index == 1
    [(queue, kwargs, task)] = sender.sent
    assert (queue, task) == ("images.slow", "cascade.image")
    assert kwargs["request"]["prompt"] == "a lighthouse"
    record = json.loads(fake_redis.get(keys.pending_record(RID)) or b"{}")
    assert (record["queue"], record["task"]) == ("images.slow", "cascade.image")
    assert task_of(record) == "cascade.image"
    assert task_of({"queue": "chat", "kwargs": {}}) == "cascade.chat", "a record naming no task is a chat one"
    assert task_of({"queue": "chat", "kwargs": {}, "task": "celery.backend_cleanup"}) is None


def test_an_in_flight_image_run_is_recorded_as_cascade_image(
    fake_redis: fakeredis.FakeRedis, painters: Painters
) -> None:
    seen: dict[str, Any] = {}

    def look(call: ImageCall, on_image: OnImage) -> list[GeneratedImageData]:
        seen.update(json.loads(fake_redis.get(keys.inflight_record(RID)) or b"{}"))
        on_image(image(0, png(30)))
        return [image(0, png(30))]

    painters.script("first", look)
    run_image(runtime_for(fake_redis, ["first"]))
    assert seen["task"] == "cascade.image" and seen["kwargs"]["request"]["request_id"] == RID


class Watching:
    """A request observer that records whatever it hears."""

    def __init__(self) -> None:
        self.heard: list[str] = []

    def request_finished(self, request: Any, reply: Any) -> None:
        self.heard.append("finished")

    def request_handed_off(self, request: Any, state: Any, queue: str) -> None:
        self.heard.append("handed_off")


def test_request_observers_are_skipped_for_image_requests(fake_redis: fakeredis.FakeRedis, painters: Painters) -> None:
    painters.script("first", makes(image(0, png(30))))
    runtime = runtime_for(fake_redis, ["first"])
    watching = Watching()
    runtime.observers.append(watching)
    assert run_image(runtime).status == "succeeded"
    assert watching.heard == []
