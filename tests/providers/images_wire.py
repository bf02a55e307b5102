"""The Images API wire format the fake server speaks in the image provider tests.

``POST /images/generations`` answers an ``ImagesResponse`` JSON (``created``, ``data``: items
with ``b64_json`` or ``url`` and ``revised_prompt``; the GPT image models add
``output_format``, ``quality``, ``size``, ``background`` and ``usage``), or, with
``stream: true``, server-sent events ``image_generation.partial_image`` then
``image_generation.completed``, each sent with its ``event:`` name. ``ImageServer`` also serves
image files by ``GET``, as a storage account behind a DALL-E URL does.
"""

from __future__ import annotations

import base64
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import parse_qs, urlsplit

from tests.fakes.http import FakeHTTPServer, Received, Reply

CREATED = 1_746_000_000
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC = b"\xff\xd8\xff\xe0"


def png(size: int = 64, fill: bytes = b"p") -> bytes:
    """Bytes that start like a PNG file, ``size`` long."""
    return PNG_MAGIC + fill * (size - len(PNG_MAGIC))


def jpeg(size: int = 64) -> bytes:
    """Bytes that start like a JPEG file, ``size`` long."""
    return JPEG_MAGIC + b"j" * (size - len(JPEG_MAGIC))


def b64(data: bytes) -> str:
    """``data`` as the API encodes it."""
    return base64.b64encode(data).decode()


def images_answer(*items: dict[str, Any], **fields: Any) -> Reply:
    """An ``ImagesResponse`` holding ``items`` (see ``b64_item`` / ``url_item``)."""
    return Reply(json_body={"created": CREATED, "data": list(items), **fields})


def b64_item(data: bytes, revised_prompt: str | None = None) -> dict[str, Any]:
    """One image answered as base64."""
    item: dict[str, Any] = {"b64_json": b64(data)}
    if revised_prompt is not None:
        item["revised_prompt"] = revised_prompt
    return item


def url_item(url: str, revised_prompt: str | None = None) -> dict[str, Any]:
    """One image answered as a URL."""
    item: dict[str, Any] = {"url": url}
    if revised_prompt is not None:
        item["revised_prompt"] = revised_prompt
    return item


def gpt_image_usage() -> dict[str, Any]:
    """The ``usage`` of a GPT image answer."""
    return {
        "input_tokens": 12,
        "input_tokens_details": {"image_tokens": 0, "text_tokens": 12},
        "output_tokens": 4160,
        "total_tokens": 4172,
    }


def partial_event(data: bytes, index: int, output_format: str = "png") -> dict[str, Any]:
    """An ``image_generation.partial_image`` event."""
    return {
        "type": "image_generation.partial_image",
        "b64_json": b64(data),
        "background": "auto",
        "created_at": CREATED,
        "output_format": output_format,
        "partial_image_index": index,
        "quality": "medium",
        "size": "1024x1024",
    }


def completed_event(data: bytes, output_format: str = "png") -> dict[str, Any]:
    """The ``image_generation.completed`` event."""
    return {
        "type": "image_generation.completed",
        "b64_json": b64(data),
        "background": "auto",
        "created_at": CREATED,
        "output_format": output_format,
        "quality": "medium",
        "size": "1024x1024",
        "usage": gpt_image_usage(),
    }


def image_stream(*events: dict[str, Any], cut_after: int | None = None) -> Reply:
    """``events`` as server-sent events, each with its ``event:`` name."""
    return Reply(events=list(events), event_names=[event["type"] for event in events], cut_after=cut_after)


@dataclass
class ImageFile:
    """A file ``ImageServer`` serves by ``GET``: its bytes, whether it says its length (else it
    is sent in 4 KiB chunks, ``piece_delay_s`` apart), its status."""

    data: bytes
    content_length: bool = True
    status: int = 200
    piece_delay_s: float = 0.0


class ImageServer(FakeHTTPServer):
    """A ``FakeHTTPServer`` that also serves ``files`` (path -> ``ImageFile``) by ``GET``; every
    ``GET`` is recorded in ``received`` like any request."""

    def __init__(self) -> None:
        self.files: dict[str, ImageFile] = {}
        super().__init__()

    def serve(self, path: str, data: bytes, **fields: Any) -> str:
        """Serve ``data`` at ``path``; returns its full URL."""
        self.files[path] = ImageFile(data, **fields)
        return f"{self.url}{path}"

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        base: Any = super()._handler_class()
        fake = self

        class Handler(base):  # type: ignore[misc]
            def do_GET(self) -> None:
                parts = urlsplit(self.path)
                found = fake.files.get(parts.path)
                if found is None:
                    super().do_GET()
                    return
                fake.received.append(
                    Received("GET", parts.path, parse_qs(parts.query), dict(self.headers.items()), None)
                )
                self.send_response(found.status)
                self.send_header("Content-Type", "image/png")
                if found.content_length:
                    self.send_header("Content-Length", str(len(found.data)))
                else:
                    self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                try:
                    if found.content_length:
                        self.wfile.write(found.data)
                        return
                    for start in range(0, len(found.data), 4096):
                        if start and found.piece_delay_s:
                            time.sleep(found.piece_delay_s)
                        piece = found.data[start : start + 4096]
                        self.wfile.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
                        self.wfile.flush()
                    self.wfile.write(b"0\r\n\r\n")
                except (BrokenPipeError, ConnectionResetError):  # the client stopped reading: an oversize refusal
                    self.close_connection = True

        handler: type[BaseHTTPRequestHandler] = Handler
        return handler
