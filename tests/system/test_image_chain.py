"""``cascade.image`` end to end: a real worker and redis-server, two ``openai_image`` providers on
fake Images APIs (tests/providers/images_wire.py) on 127.0.0.1. The first fails (a 500, retried
then fallen from; or a content-policy 400, fallen from at once), the second answers base64
images: the ``image`` events, the bytes at their keys with a TTL, the reply, the Python
client's ``wait_image``/``image_bytes``, ``cascade image`` saving the files, a size no provider
takes, and a lost image request resent by the reaper as ``cascade.image``."""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from tasks.contract import keys
from tasks.contract.images import ImageReply, ImageRequest
from tasks.producer import pending
from tasks.producer.client import CascadeClient
from tests.providers.images_wire import ImageServer, b64_item, images_answer, png
from tests.providers.openai_wire import error_reply
from tests.support.stack import REPO, local_stack
from tests.support.stream_contract import assert_well_formed

pytestmark = pytest.mark.integration

CONFIG = """
[providers.primary]
type = "openai_image"
model = "dall-e-2"
api_base_url = "{first}/v1"
max_retries = 1
backoff_initial_s = 0.01
cooldown_failures = 0
timeout_s = 10

[providers.backup]
type = "openai_image"
model = "dall-e-2"
api_base_url = "{second}/v1"
timeout_s = 10

[providers.talker]
type = "scripted"
text = "hello"

[chains]
images = ["primary", "backup"]
default = ["talker"]
"""
FIRST_IMAGE, SECOND_IMAGE = png(300, b"a"), png(200, b"b")


@dataclass
class Stack:
    url: str
    first: ImageServer
    second: ImageServer


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("image-chain")
    with ImageServer() as first, ImageServer() as second:
        first.default = error_reply(500, "The server had an error while processing your request.", "server_error")
        second.default = images_answer(
            b64_item(FIRST_IMAGE, revised_prompt="a lighthouse at dusk"), b64_item(SECOND_IMAGE)
        )
        config = CONFIG.format(first=first.url, second=second.url)
        env = {"OPENAI_API_KEY": "sk-test-images", "CASCADE_REAPER_INTERVAL_S": "0.2"}
        with local_stack(workdir, config, extra_env=env) as local:
            yield Stack(local.url, first, second)


def posts(server: ImageServer) -> int:
    return sum(1 for received in server.received if received.method == "POST")


def test_a_500_is_retried_then_the_next_provider_answers_with_stored_images(stack: Stack) -> None:
    tried_before = posts(stack.first)
    with CascadeClient(stack.url) as client:
        request_id = client.submit_image(prompt="a lighthouse", n=2, metadata={"order": "o-7"})
        events = list(client.events(request_id, timeout_s=60))
        reply = client.wait_image(request_id, timeout_s=10)
        assert client.image_bytes(reply.images[0].key) == FIRST_IMAGE
        assert client.image_bytes(reply.images[1].key) == SECOND_IMAGE
        ttls = [client.redis.ttl(image.key) for image in reply.images]
    assert_well_formed(events, request_id)
    assert events[-1].reply == reply
    assert reply.status == "succeeded" and reply.metadata == {"order": "o-7"}
    assert [e.type for e in events] == ["start", "fallback", "fallback", "image", "image", "done"]
    shown = [(e.index, e.key, e.provider, e.partial) for e in events if e.type == "image"]
    assert shown == [
        (0, keys.image_key(request_id, 0), "backup", None),
        (1, keys.image_key(request_id, 1), "backup", None),
    ]
    assert [(i.key, i.mime_type, i.bytes, i.revised_prompt) for i in reply.images] == [
        (keys.image_key(request_id, 0), "image/png", 300, "a lighthouse at dusk"),
        (keys.image_key(request_id, 1), "image/png", 200, None),
    ]
    assert all(ttl > 86_000 for ttl in ttls), ttls
    assert [(a.provider, a.error_type) for a in reply.meta.attempts] == [
        ("primary", "server_error"),
        ("primary", "server_error"),
        ("backup", None),
    ]
    assert reply.meta.failed_chat_generators == ["primary"] and reply.meta.successful_chat_generator_index == 1
    assert posts(stack.first) - tried_before == 2, "one try and one retry"
    sent = stack.second.received[-1].body
    assert (sent["model"], sent["prompt"], sent["n"], sent["response_format"]) == (
        "dall-e-2",
        "a lighthouse",
        2,
        "b64_json",
    )


def test_a_content_policy_refusal_falls_through_without_a_retry(stack: Stack) -> None:
    tried_before = posts(stack.first)
    stack.first.queue(
        error_reply(
            400, "Your request was rejected by the safety system.", "invalid_request_error", "content_policy_violation"
        )
    )
    with CascadeClient(stack.url) as client:
        reply = client.wait_image(client.submit_image(prompt="a lighthouse"), timeout_s=60)
    assert reply.status == "succeeded" and reply.meta.provider == "backup"
    assert [(a.provider, a.error_type) for a in reply.meta.attempts] == [
        ("primary", "content_filter"),
        ("backup", None),
    ]
    assert posts(stack.first) - tried_before == 1


def test_a_size_no_provider_takes_fails_naming_the_field_without_a_call(stack: Stack) -> None:
    before = (posts(stack.first), posts(stack.second))
    with CascadeClient(stack.url) as client:
        reply = client.wait_image(client.submit_image(prompt="a lighthouse", size="2048x2048"), timeout_s=60)
    assert reply.status == "failed" and reply.images == []
    assert reply.error is not None and "primary: size: '2048x2048' is not one dall-e-2 takes" in reply.error.message
    assert "backup: size:" in reply.error.message
    assert (posts(stack.first), posts(stack.second)) == before


def test_cascade_image_saves_the_files(stack: Stack, tmp_path: Path) -> None:
    command = [sys.executable, "-m", "tasks.producer.cli", "--redis-url", stack.url, "image"]
    command += ["--prompt", "a lighthouse", "-n", "2", "--out", str(tmp_path), "--wait", "60"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=90, cwd=REPO, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    saved = sorted(tmp_path.iterdir())
    assert [path.suffix for path in saved] == [".png", ".png"]
    assert sorted(path.read_bytes() for path in saved) == sorted([FIRST_IMAGE, SECOND_IMAGE])


def test_a_lost_image_message_is_resent_as_cascade_image(stack: Stack) -> None:
    # A request recorded as sent whose message never reached Redis (lost between BRPOP and
    # unacked): the reaper's sweep sends it again, as the task its record names.
    request_id = f"lost-{uuid.uuid4().hex[:8]}"
    request = ImageRequest(request_id=request_id, prompt="a lighthouse")
    kwargs = {"request": request.model_dump(mode="json", exclude_none=True)}
    rdb = redis.Redis.from_url(stack.url)
    try:
        pending.note_sent(rdb, request_id, "chat", kwargs, task="cascade.image")
        with CascadeClient(stack.url) as client:
            reply = client.wait_image(request_id, timeout_s=60)
    finally:
        rdb.close()
    assert isinstance(reply, ImageReply) and reply.status == "succeeded"
    assert reply.images[0].key == keys.image_key(request_id, 0)
