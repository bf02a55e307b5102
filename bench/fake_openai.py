"""A fast fake OpenAI-compatible server for the benchmarks, on 127.0.0.1, in its own process.

It speaks the real Chat Completions wire format over HTTP/1.1 with keep-alive: a streamed
request gets ``text/event-stream`` with ``Transfer-Encoding: chunked`` — a role chunk, one
``chat.completion.chunk`` per piece of ``text`` (``chunk_size`` characters each, the first
after ``first_chunk_delay_ms`` and the others ``chunk_delay_ms`` apart), a finish chunk, a
usage chunk when ``stream_options.include_usage`` is set, and ``data: [DONE]``; a plain
request gets one ``chat.completion`` JSON object. It runs on asyncio in a process of its own, so
it takes no CPU time from the process being measured and paces every path alike.

    python -m bench.fake_openai --port 8000 --text "..." --chunk-size 4 \
        --first-chunk-delay-ms 20 --chunk-delay-ms 2
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

from worker.demo.local import LOOPBACK, free_port

MODEL = "gpt-4.1-mini-2025-04-14"
_ID = "chatcmpl-bench0000000000000000000000"


@dataclass(frozen=True)
class Pace:
    """What the server streams and how fast."""

    text: str
    chunk_size: int
    first_chunk_delay_ms: float
    chunk_delay_ms: float

    @property
    def pieces(self) -> list[str]:
        """The text in chunks of ``chunk_size`` characters."""
        return [self.text[i : i + self.chunk_size] for i in range(0, len(self.text), self.chunk_size)]


def _chunk(model: str, delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
    return {
        "id": _ID,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": "fp_bench",
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
        "usage": None,
    }


def _frame(data: str) -> bytes:
    """One server-sent event in one HTTP chunk."""
    event = f"data: {data}\n\n".encode()
    return f"{len(event):x}\r\n".encode() + event + b"\r\n"


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


async def _stream(writer: asyncio.StreamWriter, pace: Pace, body: dict[str, Any]) -> None:
    model = str(body.get("model") or MODEL)
    writer.write(
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\n"
        b"cache-control: no-cache\r\ntransfer-encoding: chunked\r\n\r\n"
    )
    writer.write(_frame(json.dumps(_chunk(model, {"role": "assistant", "content": ""}))))
    await writer.drain()
    pieces = pace.pieces
    for number, piece in enumerate(pieces):
        delay_ms = pace.first_chunk_delay_ms if number == 0 else pace.chunk_delay_ms
        if delay_ms > 0:
            await asyncio.sleep(delay_ms / 1000)
        writer.write(_frame(json.dumps(_chunk(model, {"content": piece}))))
        await writer.drain()
    writer.write(_frame(json.dumps(_chunk(model, {}, "stop"))))
    if (body.get("stream_options") or {}).get("include_usage"):
        usage_chunk = _chunk(model, {})
        usage_chunk["choices"], usage_chunk["usage"] = [], _usage(12, len(pieces))
        writer.write(_frame(json.dumps(usage_chunk)))
    writer.write(_frame("[DONE]") + b"0\r\n\r\n")
    await writer.drain()


def _json_response(status: str, payload: dict[str, Any]) -> bytes:
    data = json.dumps(payload).encode()
    head = f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {len(data)}\r\n\r\n"
    return head.encode() + data


def _completion(pace: Pace, body: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": _ID,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": str(body.get("model") or MODEL),
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": pace.text, "refusal": None},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": _usage(12, len(pace.pieces)),
    }


async def _serve_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, pace: Pace) -> None:
    try:
        while True:
            request_line = await reader.readline()
            if not request_line:
                return
            headers: dict[str, str] = {}
            while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
                name, _, value = line.decode("latin-1").partition(":")
                headers[name.strip().lower()] = value.strip()
            raw = await reader.readexactly(int(headers.get("content-length") or 0))
            method, path, _version = request_line.decode("latin-1").split(" ", 2)
            if method == "POST" and path.rstrip("/").endswith("/chat/completions"):
                body = json.loads(raw or b"{}")
                if body.get("stream"):
                    await _stream(writer, pace, body)
                else:
                    writer.write(_json_response("200 OK", _completion(pace, body)))
            else:
                error = {"error": {"message": f"no route {path}", "type": "invalid_request_error", "code": None}}
                writer.write(_json_response("404 Not Found", error))
            await writer.drain()
            if headers.get("connection", "").lower() == "close":
                return
    except (ConnectionError, asyncio.IncompleteReadError):
        return
    finally:
        writer.close()


async def serve(port: int, pace: Pace) -> None:
    """Serve until killed."""

    async def on_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _serve_connection(reader, writer, pace)

    server = await asyncio.start_server(on_connection, LOOPBACK, port)
    async with server:
        await server.serve_forever()


def start(pace: Pace, log: Any = subprocess.DEVNULL) -> tuple[subprocess.Popen[bytes], str]:
    """Start the server in its own process group; return it and its ``/v1`` base URL."""
    port = free_port()
    args = [sys.executable, "-m", "bench.fake_openai", "--port", str(port), "--text", pace.text]
    args += ["--chunk-size", str(pace.chunk_size), "--first-chunk-delay-ms", str(pace.first_chunk_delay_ms)]
    args += ["--chunk-delay-ms", str(pace.chunk_delay_ms)]
    process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    give_up = time.monotonic() + 10
    while True:
        try:
            with socket.create_connection((LOOPBACK, port), timeout=1):
                return process, f"http://{LOOPBACK}:{port}/v1"
        except OSError:
            if process.poll() is not None or time.monotonic() > give_up:
                raise RuntimeError("the fake OpenAI server did not start") from None
            time.sleep(0.02)


def main() -> None:
    """Entry point."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--text", required=True)
    parser.add_argument("--chunk-size", type=int, default=4)
    parser.add_argument("--first-chunk-delay-ms", type=float, default=0.0)
    parser.add_argument("--chunk-delay-ms", type=float, default=0.0)
    args = parser.parse_args()
    pace = Pace(args.text, args.chunk_size, args.first_chunk_delay_ms, args.chunk_delay_ms)
    try:
        asyncio.run(serve(args.port, pace))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
