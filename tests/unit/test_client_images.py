"""The producer's side of ``cascade.image`` (tasks.producer.client, tasks.producer.cli): the
request sent, the reply and the image bytes read back, the images saved to files."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import fakeredis
import pytest
from pydantic import ValidationError

from tasks.contract import keys
from tasks.contract.schemas import IMAGE_TASK_NAME, GeneratedImage, ImageReply, ImageRequest
from tasks.producer.cli import save_images
from tasks.producer.client import CascadeClient
from tests.support.recording_celery import RecordingCelery

PNG = b"\x89PNG\r\n\x1a\n" + b"\x01" * 32


@pytest.fixture
def client(fake_redis: fakeredis.FakeRedis) -> Iterator[CascadeClient]:
    cascade = CascadeClient("redis://127.0.0.1:1/0")
    cascade.redis = fake_redis
    celery = RecordingCelery()
    cascade._celery = celery  # type: ignore[assignment]
    yield cascade


def test_submit_image_sends_cascade_image_with_its_request(client: CascadeClient) -> None:
    request_id = client.submit_image(prompt="a lighthouse at dusk", size="1024x1024", n=2, queue="chat")
    [(name, options)] = client._celery.sent  # type: ignore[attr-defined]
    assert name == IMAGE_TASK_NAME and options["task_id"] == request_id and options["queue"] == "chat"
    sent = ImageRequest.model_validate(options["kwargs"]["request"])
    assert sent.prompt == "a lighthouse at dusk" and sent.size == "1024x1024" and sent.n == 2
    assert sent.chain == "images"
    record = json.loads(client.redis.get(keys.pending_record(request_id)) or b"{}")
    assert record["task"] == IMAGE_TASK_NAME, "a resend sends the image task again"


def test_a_bad_image_request_is_refused_before_sending(client: CascadeClient) -> None:
    with pytest.raises(ValidationError, match="size"):
        client.submit_image(prompt="x", size="huge")
    assert client._celery.sent == []  # type: ignore[attr-defined]


def test_the_reply_and_the_bytes_are_read_back_and_saved(client: CascadeClient, tmp_path: Path) -> None:
    key = keys.image_key("img-1", 0)
    client.redis.set(key, PNG)
    reply = ImageReply(
        request_id="img-1",
        status="succeeded",
        images=[
            GeneratedImage(key=key, mime_type="image/png", bytes=len(PNG)),
            GeneratedImage(key=keys.image_key("img-1", 1), mime_type="image/jpeg", bytes=10),  # expired
        ],
    )
    client.redis.set(keys.reply_key("img-1"), reply.model_dump_json())
    assert client.image_reply("img-1") == reply
    assert client.image_bytes(key) == PNG and client.image_bytes(keys.image_key("img-1", 1)) is None
    saved = save_images(client, reply, tmp_path / "out")
    assert saved == [tmp_path / "out" / "img-1-0.png"]
    assert saved[0].read_bytes() == PNG
