"""``cascade``: submit a chat or image request and follow its stream, show a reply, cancel, run the demo."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TextIO

from tasks.contract.schemas import ChatReply, ImageReply, StreamEvent
from tasks.producer.client import CascadeClient
from tasks.producer.conversation import user_message


def print_stream(events: Iterable[StreamEvent], out: TextIO = sys.stdout) -> ChatReply | None:
    """Print deltas and tool-call fragments as they arrive, and a note for each fallback, in
    order; a line ``[choice i]`` marks where the text of another choice (``n`` > 1) continues.
    Return the reply."""
    reply = None
    choice = 0
    for event in events:
        if event.type == "chunk":
            if (event.index or 0) != choice:
                choice = event.index or 0
                out.write(f"\n[choice {choice}] ")
            if event.tool_call is not None:
                fragment = event.tool_call
                if fragment.name is not None:
                    out.write(f"\n[tool call {fragment.index}: {fragment.name} {fragment.id or ''}] ")
                out.write(fragment.arguments_delta)
            elif event.delta:
                out.write(event.delta)
            out.flush()
        elif event.type == "fallback":
            out.write(
                f"\n[attempt {event.attempt} of {event.provider} failed ({event.error_type}); "
                "its text is void, falling back]\n"
            )
            out.flush()
        elif event.is_terminal:
            out.write("\n")
            reply = event.reply if isinstance(event.reply, ChatReply) else None
    return reply


def describe_reply(reply: ChatReply) -> str:
    """A short human summary of a reply's outcome and meta."""
    meta = reply.meta
    lines = [f"status: {reply.status}"]
    if reply.error:
        lines.append(f"error: {reply.error.type}: {reply.error.message}")
    if meta.provider:
        lines.append(f"provider: {meta.provider} (chain index {meta.successful_chat_generator_index})")
    attempts = ", ".join(f"{a.provider}:{a.outcome}{'/' + a.error_type if a.error_type else ''}" for a in meta.attempts)
    lines.append(f"attempts ({meta.total_attempts}): {attempts or '-'}")
    timings = meta.timings
    lines.append(f"timings: queued {timings.queued_ms} ms, ttft {timings.ttft_ms} ms, total {timings.total_ms} ms")
    for item in reply.replies:
        usage = item.meta.usage
        lines.append(
            f"choice {item.meta.index}: model {item.meta.model}, finish: {item.meta.finish_reason}, "
            f"tokens: {usage.prompt_tokens} in / {usage.completion_tokens} out"
        )
        lines.extend(
            f"  tool call {call.id}: {call.function.name}({call.function.arguments})" for call in item.tool_calls or []
        )
        if item.meta.hallucination_decision is not None:
            lines.append(
                f"  hallucination risk: {item.meta.hallucination_decision}, bound {item.meta.hallucination_risk:.3f}"
            )
        elif item.meta.hallucination_error is not None:
            lines.append(f"  hallucination risk: not scored ({item.meta.hallucination_error})")
    return "\n".join(lines)


def _json_argument(value: str) -> Any:
    """A JSON argument given inline, as ``@file``, or as ``-`` (stdin)."""
    if value == "-":
        return json.loads(sys.stdin.read())
    if value.startswith("@"):
        return json.loads(Path(value[1:]).read_text())
    return json.loads(value)


def request_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The request ``cascade submit`` sends, from its parsed arguments."""
    kwargs: dict[str, Any] = {}
    if args.max_tokens is not None:
        kwargs["max_tokens"] = args.max_tokens
    if args.temperature is not None:
        kwargs["temperature"] = args.temperature
    if args.n is not None:
        kwargs["n"] = args.n
    if args.response_format is not None:
        shorthand = {"json_object": {"type": "json_object"}, "text": {"type": "text"}}
        kwargs["response_format"] = shorthand.get(args.response_format) or _json_argument(args.response_format)
    fields: dict[str, Any] = {
        "chain": args.chain,
        "request_id": args.id,
        "timeout_s": args.timeout,
        "stream": not args.no_stream,
        "generation_kwargs": kwargs,
    }
    if args.hallucination_score is not None:
        defaults = args.hallucination_score == "defaults"
        fields["hallucination_score"] = {} if defaults else _json_argument(args.hallucination_score)
    if args.tools is not None:
        fields["tools"] = _json_argument(args.tools)
    if args.tool_choice is not None:
        named = args.tool_choice not in ("auto", "none", "required")
        fields["tool_choice"] = (
            {"type": "function", "function": {"name": args.tool_choice}} if named else args.tool_choice
        )
    if args.messages:
        fields["messages"] = _json_argument(args.messages)
    else:
        prompt = args.prompt if args.prompt != "-" else sys.stdin.read()
        if args.image:
            system = [{"role": "system", "content": args.system}] if args.system else []
            fields["messages"] = [*system, user_message(prompt, args.image)]
        else:
            fields["prompt"] = prompt
            fields["system_prompt"] = args.system
    return fields


def _submit(args: argparse.Namespace) -> int:
    fields = request_fields(args)
    with CascadeClient(args.redis_url) as client:
        request_id = client.submit(queue=args.queue, **fields)
        print(f"request {request_id}", file=sys.stderr)
        if args.no_follow:
            print(request_id)
            return 0
        reply = print_stream(client.events(request_id, timeout_s=args.wait)) or client.reply(request_id)
    if reply is None:
        print("no reply", file=sys.stderr)
        return 1
    print(reply.model_dump_json(indent=2) if args.json else describe_reply(reply), file=sys.stderr)
    return 0 if reply.status == "succeeded" else 1


def _image(args: argparse.Namespace) -> int:
    fields = {
        "prompt": args.prompt if args.prompt != "-" else sys.stdin.read(),
        "chain": args.chain,
        "request_id": args.id,
        "size": args.size,
        "quality": args.quality,
        "style": args.style,
        "background": args.background,
        "output_format": args.format,
        "n": args.n,
        "timeout_s": args.timeout,
    }
    out_dir = Path(args.out)
    with CascadeClient(args.redis_url) as client:
        request_id = client.submit_image(queue=args.queue, **fields)
        print(f"request {request_id}", file=sys.stderr)
        for event in client.events(request_id, timeout_s=args.wait):
            if event.type == "image":
                print(f"image {event.index}{' (partial)' if event.partial else ''} ready", file=sys.stderr)
            elif event.type == "fallback":
                print(f"attempt {event.attempt} of {event.provider} failed ({event.error_type})", file=sys.stderr)
        reply = client.image_reply(request_id)
        if reply is None:
            print("no reply", file=sys.stderr)
            return 1
        saved = save_images(client, reply, out_dir)
    for path in saved:
        print(path)
    if reply.error is not None:
        print(f"status: {reply.status}, error: {reply.error.type}: {reply.error.message}", file=sys.stderr)
    return 0 if reply.status == "succeeded" else 1


def save_images(client: CascadeClient, reply: ImageReply, out_dir: Path) -> list[Path]:
    """Write each image of ``reply`` to ``out_dir`` as ``{request_id}-{index}.{ext}``; return the
    paths (an image whose bytes expired is skipped)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    saved = []
    for index, image in enumerate(reply.images):
        data = client.image_bytes(image.key)
        if data is None:
            continue
        extension = image.mime_type.rpartition("/")[2].replace("jpeg", "jpg")
        path = out_dir / f"{reply.request_id}-{index}.{extension}"
        path.write_bytes(data)
        saved.append(path)
    return saved


def _reply(args: argparse.Namespace) -> int:
    with CascadeClient(args.redis_url) as client:
        reply = client.reply(args.request_id)
    if reply is None:
        print(f"no reply stored for {args.request_id}", file=sys.stderr)
        return 1
    print(reply.model_dump_json(indent=2) if args.json else describe_reply(reply))
    return 0


def _follow(args: argparse.Namespace) -> int:
    with CascadeClient(args.redis_url) as client:
        reply = print_stream(client.events(args.request_id, timeout_s=args.wait))
    if reply is not None:
        print(describe_reply(reply), file=sys.stderr)
    return 0


def _cancel(args: argparse.Namespace) -> int:
    with CascadeClient(args.redis_url) as client:
        client.cancel(args.request_id)
    print(f"cancel requested for {args.request_id}", file=sys.stderr)
    return 0


def _demo(args: argparse.Namespace) -> int:
    # The demo starts Redis and a worker: a program of the worker's side, run as one, so the
    # producer's command loads no worker code (``python -m worker.demo``).
    command = [sys.executable, "-m", "worker.demo", "--prompt", args.prompt, "--chain", args.chain]
    os.execv(sys.executable, command)  # noqa: S606 - our own interpreter and module, no shell
    return 0  # not reached: execv replaces this process


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``cascade``."""
    parser = argparse.ArgumentParser(prog="cascade", description=__doc__)
    parser.add_argument("--redis-url", help="default: $CASCADE_REDIS_URL or redis://127.0.0.1:6379/0")
    commands = parser.add_subparsers(dest="command", required=True)

    submit = commands.add_parser("submit", help="enqueue a request and print its tokens as they stream")
    source = submit.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", "-p", help="the user message ('-' reads stdin)")
    source.add_argument(
        "--messages", help="the conversation as a JSON list of messages (inline, @file, or - for stdin)"
    )
    submit.add_argument("--system", help="system prompt (with --prompt)")
    submit.add_argument("--image", action="append", help="an image file to send with --prompt (repeatable)")
    submit.add_argument("--tools", help="tool definitions as a JSON list (inline, @file, or -)")
    submit.add_argument("--tool-choice", help="auto, none, required, or the name of one tool")
    submit.add_argument("--response-format", help="json_object, text, or a JSON response_format (inline or @file)")
    submit.add_argument("-n", type=int, help="number of choices")
    submit.add_argument(
        "--hallucination-score",
        help="score the answer's hallucination risk: 'defaults', or a JSON config (inline or @file)",
    )
    submit.add_argument("--chain", default="default")
    submit.add_argument("--id", help="request id (default: a new UUID)")
    submit.add_argument("--max-tokens", type=int)
    submit.add_argument("--temperature", type=float)
    submit.add_argument("--timeout", type=float, help="the request's deadline in seconds")
    submit.add_argument("--queue", help="queue to send to (default: chat)")
    submit.add_argument("--no-stream", action="store_true", help="ask for the reply only, no chunk events")
    submit.add_argument("--no-follow", action="store_true", help="print the id and return at once")
    submit.add_argument("--wait", type=float, default=600.0, help="give up following after this many seconds")
    submit.add_argument("--json", action="store_true", help="print the whole reply as JSON")
    submit.set_defaults(handler=_submit)

    image = commands.add_parser("image", help="enqueue an image request (cascade.image) and save the images")
    image.add_argument("--prompt", "-p", required=True, help="what to draw ('-' reads stdin)")
    image.add_argument("--chain", default="images")
    image.add_argument("--id", help="request id (default: a new UUID)")
    image.add_argument("--size", help="e.g. 1024x1024, or auto")
    image.add_argument("--quality", help="standard, hd, low, medium, high, auto (per model)")
    image.add_argument("--style", help="vivid or natural (dall-e-3)")
    image.add_argument("--background", help="transparent, opaque or auto (gpt-image-1)")
    image.add_argument("--format", help="png, jpeg or webp (gpt-image-1)")
    image.add_argument("-n", type=int, help="number of images")
    image.add_argument("--timeout", type=float, help="the request's deadline in seconds")
    image.add_argument("--queue", help="queue to send to (default: the chain's route)")
    image.add_argument("--out", default=".", help="folder to save the images in")
    image.add_argument("--wait", type=float, default=600.0, help="give up after this many seconds")
    image.set_defaults(handler=_image)

    reply = commands.add_parser("reply", help="show a stored reply")
    reply.add_argument("request_id")
    reply.add_argument("--json", action="store_true")
    reply.set_defaults(handler=_reply)

    follow = commands.add_parser("follow", help="replay and follow a request's stream")
    follow.add_argument("request_id")
    follow.add_argument("--wait", type=float, default=600.0)
    follow.set_defaults(handler=_follow)

    cancel = commands.add_parser("cancel", help="cancel a running request")
    cancel.add_argument("request_id")
    cancel.set_defaults(handler=_cancel)

    demo = commands.add_parser("demo", help="start Redis and a worker locally and stream one answer")
    demo.add_argument("--prompt", default="What is Natural Language Processing? Answer in two sentences.")
    demo.add_argument("--chain", default="default", help="default: SmolLM2 on the CPU; rehearsal: scripted")
    demo.set_defaults(handler=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``cascade`` command."""
    args = build_parser().parse_args(argv)
    handler = args.handler
    result: int = handler(args)
    return result


if __name__ == "__main__":
    raise SystemExit(main())
