"""The wire contract of ``cascade.image`` (tasks/contract/images.py, tasks/contract/keys.py): ImageRequest,
ImageReply, the image key and the events that carry them."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from tasks.contract import keys
from tasks.contract.images import MAX_IMAGE_PROMPT_CHARS, MAX_IMAGES
from tasks.contract.schemas import (
    IMAGE_TASK_NAME,
    TASK_NAME,
    ChainMeta,
    ChatReply,
    ErrorInfo,
    GeneratedImage,
    ImageReply,
    ImageRequest,
    StreamEvent,
)


def test_defaults() -> None:
    request = ImageRequest.model_validate({"prompt": "a lighthouse at dusk"})
    assert request.chain == "images"
    assert request.model_dump(exclude_none=True) == {
        "prompt": "a lighthouse at dusk",
        "chain": "images",
        "metadata": {},
    }
    assert IMAGE_TASK_NAME == "cascade.image" != TASK_NAME


def test_every_field() -> None:
    data = {
        "request_id": "img-1",
        "prompt": "a lighthouse",
        "chain": "images.hd",
        "size": "1792x1024",
        "quality": "hd",
        "style": "natural",
        "background": "transparent",
        "output_format": "webp",
        "n": MAX_IMAGES,
        "timeout_s": 120,
        "metadata": {"trace": "t-1"},
    }
    request = ImageRequest.model_validate(data)
    assert request.model_dump(exclude_none=True) == data
    assert ImageRequest.model_validate(request.model_dump(exclude_none=True)) == request


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"prompt": ""}, "prompt"),
        ({"prompt": "   \n"}, "prompt"),
        ({"prompt": "x" * (MAX_IMAGE_PROMPT_CHARS + 1)}, "prompt"),
        ({"prompt": None}, "prompt"),
        ({"size": "big"}, "size"),
        ({"size": "1024x"}, "size"),
        ({"size": "0x1024"}, "size"),
        ({"quality": "ultra"}, "quality"),
        ({"style": "baroque"}, "style"),
        ({"background": "green"}, "background"),
        ({"output_format": "gif"}, "output_format"),
        ({"n": 0}, "n"),
        ({"n": MAX_IMAGES + 1}, "n"),
        ({"timeout_s": 0}, "timeout_s"),
        ({"chain": "bad chain"}, "chain"),
        ({"request_id": "a:b"}, "request_id"),
        ({"metadata": {f"k{i}": i for i in range(65)}}, "metadata"),
        ({"response_format": "url"}, "response_format"),
    ],
)
def test_bad_fields_are_named(fields: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError) as exc:
        ImageRequest.model_validate({"prompt": "a lighthouse", **fields})
    assert [".".join(str(part) for part in error["loc"]) for error in exc.value.errors()] == [field]


def test_prompt_is_required() -> None:
    with pytest.raises(ValidationError, match="prompt"):
        ImageRequest.model_validate({})


def test_image_key() -> None:
    assert keys.image_key("img-1", 0) == "cascade:image:img-1:0"
    assert keys.IMAGE.format(request_id="r", index=3) == keys.image_key("r", 3)


def _reply() -> ImageReply:
    image = GeneratedImage(key=keys.image_key("img-1", 0), mime_type="image/png", bytes=1234, revised_prompt="p'")
    return ImageReply(
        request_id="img-1",
        status="succeeded",
        images=[image],
        meta=ChainMeta(provider="dalle", total_attempts=1),
        metadata={"trace": "t-1"},
    )


def test_reply_round_trips_through_json() -> None:
    reply = _reply()
    assert ImageReply.model_validate_json(reply.model_dump_json()) == reply
    failed = ImageReply(request_id="img-2", status="failed", error=ErrorInfo(type="content_policy", message="no"))
    assert ImageReply.model_validate_json(failed.model_dump_json()).images == []


def test_done_event_carries_an_image_reply_and_a_chat_reply_stays_one() -> None:
    image_done = StreamEvent(type="done", request_id="img-1", seq=3, reply=_reply())
    again = StreamEvent.model_validate_json(image_done.model_dump_json(exclude_none=True))
    assert isinstance(again.reply, ImageReply) and again == image_done
    failed = ImageReply(request_id="img-2", status="failed")
    assert isinstance(StreamEvent(type="error", request_id="img-2", seq=1, reply=failed).reply, ImageReply)
    chat_done = StreamEvent.model_validate(
        {"type": "done", "request_id": "r", "seq": 1, "reply": {"request_id": "r", "status": "succeeded"}}
    )
    assert isinstance(chat_done.reply, ChatReply)


def test_image_events() -> None:
    ready = StreamEvent(type="image", request_id="img-1", seq=1, index=0, key=keys.image_key("img-1", 0))
    partial = StreamEvent(
        type="image", request_id="img-1", seq=2, index=1, key=keys.image_key("img-1", 1), partial=True
    )
    for event in (ready, partial):
        assert StreamEvent.model_validate_json(event.model_dump_json(exclude_none=True)) == event
        assert not event.is_terminal


@pytest.mark.parametrize(("fields", "field"), [({"index": 0}, "key"), ({"key": "cascade:image:r:0"}, "index")])
def test_an_image_event_names_what_it_lacks(fields: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError) as exc:
        StreamEvent.model_validate({"type": "image", "request_id": "r", "seq": 1, **fields})
    assert [error["loc"] for error in exc.value.errors()] == [(field,)]
