"""Tools for a local model: what its chat template is given, and how its tool calls are read.

**In.** The request's tools go to ``tokenizer.apply_chat_template(..., tools=[...])`` in OpenAI's
shape (``{type: "function", function: {name, description, parameters}}``, which transformers
passes to the template as is). ``template_messages`` hands the conversation over the way chat
templates read it: an assistant message's tool calls with ``arguments`` as an object (the
request holds JSON text), its ``content`` an empty string when it has none, and a message
made only of text parts as one string. ``template_takes_tools`` says whether a template reads
``tools`` at all: a model whose template does not is a provider without tools.

**Out.** A model writes its calls as text, in its family's way. ``TOOL_CALL_FORMATS`` is the
table of the ways Cascade reads, keyed by the entry's ``tool_call_format``:

* ``hermes``: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` blocks, any number,
  between text (Qwen 2.5/3, Hermes, SmolLM3...).
* ``template``: the tokenizer's own ``response_template`` (transformers' declarative response
  format), for a model whose tokenizer ships one.
* ``json``: an answer that is, as a whole, a bare JSON call ``{"name": ..., "arguments": ...}``
  (``parameters`` is read too, as Llama 3 writes it) or a list of them.
* ``auto`` (the default, ``detect_format``): ``template`` when the tokenizer has a
  ``response_template`` with ``tool_calls``, ``hermes`` when the chat template writes
  ``<tool_call>``, else ``json``.

``hermes`` and ``template`` run on transformers' own streaming ``ResponseParser``
(``transformers.utils.chat_parsing``); ``json`` is read here, since a bare JSON answer has no
delimiter to stream around. Every splitter streams the text outside tool-call blocks as it
comes and holds a block back until it is complete; then the block is one ``ParsedCall``. A
block whose content is not a call is given back as text, so nothing the model wrote is lost.
The splitters see the text decoded with special tokens skipped: a format whose delimiters are
special tokens is not readable here.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from providers.base import OnChunk
from providers.replies import ReplyAssembler
from tasks.contract.schemas import AssistantReply, ChatMessage, Usage

TOOL_CALLS_FIELD = "tool_calls"
HERMES_OPEN, HERMES_CLOSE = "<tool_call>", "</tool_call>"
# A response_template (transformers' declarative format) for Hermes-style blocks. The block is
# read as text and parsed here, so a block that is not a call comes back as text instead of
# failing the parser. The start anchor is unused: the parser is given no prompt prefix.
HERMES_RESPONSE_TEMPLATE: dict[str, Any] = {
    "start_anchor": "<|im_start|>assistant\n",
    "fields": {
        TOOL_CALLS_FIELD: {
            "open_pattern": r"\s*" + re.escape(HERMES_OPEN),
            "close": HERMES_CLOSE,
            "repeats": True,
            "content": "text",
            "content_args": {"strip": False},
        },
        "content": {"content": "text"},
    },
}


@dataclass(frozen=True)
class ParsedCall:
    """A call the model wrote: the function's name and its arguments as JSON text."""

    name: str
    arguments: str


Piece = str | ParsedCall


class Splitter(Protocol):
    """Reads generated text piece by piece: text to stream and completed calls."""

    def feed(self, text: str) -> list[Piece]:
        """What ``text`` (the next decoded piece) completes."""

    def finish(self) -> list[Piece]:
        """What is left once generation ended."""


class PassThrough:
    """No tools offered: every piece is text."""

    def feed(self, text: str) -> list[Piece]:
        """``text`` as it is."""
        return [text] if text else []

    def finish(self) -> list[Piece]:
        """Nothing is held back."""
        return []


def call_from(value: Any) -> ParsedCall | None:
    """A call from a parsed JSON value: ``{name, arguments | parameters}`` or OpenAI's
    ``{type: "function", function: {...}}``; None when the value is not a call."""
    if not isinstance(value, dict):
        return None
    if isinstance(value.get("function"), dict):
        value = value["function"]
    name = value.get("name")
    if not isinstance(name, str) or not name:
        return None
    arguments = value.get("arguments", value.get("parameters", {}))
    if isinstance(arguments, str):
        return ParsedCall(name, arguments)
    return ParsedCall(name, json.dumps(arguments, ensure_ascii=False))


def calls_from_text(text: str) -> list[ParsedCall] | None:
    """The calls of a JSON text holding one call or a list of them; None when it is not that."""
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return None
    values = value if isinstance(value, list) else [value]
    calls = [call_from(item) for item in values]
    if not calls or any(call is None for call in calls):
        return None
    return [call for call in calls if call is not None]


class RegionSplitter:
    """A splitter on transformers' ``ResponseParser``: the ``tool_calls`` region's content is
    held and read as calls when the region closes; every other region's text streams."""

    def __init__(self, response_template: dict[str, Any], prefix: str = "", block: tuple[str, str] = ("", "")) -> None:
        from transformers.utils.chat_parsing import ResponseParser

        self._parser: Any = ResponseParser(response_template, prefix=prefix)
        self._block = block  # the delimiters a block that is not a call is given back with
        self._held: list[str] = []
        self._broken = False

    def feed(self, text: str) -> list[Piece]:
        """Text outside blocks at once; a block when it closes."""
        if self._broken:
            return [text] if text else []
        try:
            return self._pieces(self._parser.feed(text))
        except ValueError:
            return self._give_up(text)

    def finish(self) -> list[Piece]:
        """A block left open at the end is read as it stands."""
        if self._broken:
            return []
        try:
            _, events = self._parser.finalize()
        except ValueError:
            return self._give_up("")
        return self._pieces(events)

    def _give_up(self, text: str) -> list[Piece]:
        # The template's own content parser refused a block: from here on everything is text.
        self._broken = True
        held, self._held = "".join(self._held), []
        rest = held + text
        return [rest] if rest else []

    def _pieces(self, events: Sequence[dict[str, Any]]) -> list[Piece]:
        pieces: list[Piece] = []
        for event in events:
            field = event.get("field")
            if event["type"] == "region_chunk":
                if field == TOOL_CALLS_FIELD:
                    self._held.append(event["text"])
                elif event["text"]:
                    pieces.append(event["text"])
            elif event["type"] == "region_close" and field == TOOL_CALLS_FIELD:
                raw, self._held = "".join(self._held), []
                value = event.get("value")
                calls = calls_from_text(value) if isinstance(value, str) else _calls_of_value(value)
                if calls:
                    pieces.extend(calls)
                else:
                    opening, closing = self._block
                    pieces.append(f"{opening}{raw}{closing}")
        return pieces


def _calls_of_value(value: Any) -> list[ParsedCall] | None:
    values = value if isinstance(value, list) else [value]
    calls = [call_from(item) for item in values]
    if not calls or any(call is None for call in calls):
        return None
    return [call for call in calls if call is not None]


class BareJsonSplitter:
    """The ``json`` format: an answer opening with ``{`` or ``[`` is held to the end and read as
    calls; any other answer streams as text."""

    def __init__(self) -> None:
        self._lead: list[str] = []  # whitespace before the first visible character
        self._held: list[str] | None = None  # set once the answer opens as JSON
        self._streaming = False

    def feed(self, text: str) -> list[Piece]:
        """Text at once unless the answer opened as JSON."""
        if self._streaming:
            return [text] if text else []
        if self._held is not None:
            self._held.append(text)
            return []
        stripped = text.lstrip()
        if not stripped:
            self._lead.append(text)
            return []
        if stripped[0] in "{[":
            self._held = [*self._lead, text]
            return []
        self._streaming = True
        lead, self._lead = "".join(self._lead), []
        return [lead + text]

    def finish(self) -> list[Piece]:
        """The held answer as calls, or as text when it is not calls."""
        if self._held is None:
            lead = "".join(self._lead)
            return [lead] if lead and not self._streaming else []
        text = "".join(self._held)
        calls = calls_from_text(text.strip())
        if calls:
            return list(calls)
        return [text] if text else []


def _hermes(tokenizer: Any, prefix: str) -> Splitter:
    return RegionSplitter(HERMES_RESPONSE_TEMPLATE, block=(HERMES_OPEN, HERMES_CLOSE))


def _template(tokenizer: Any, prefix: str) -> Splitter:
    return RegionSplitter(tokenizer.response_template, prefix=prefix)


def _json(tokenizer: Any, prefix: str) -> Splitter:
    return BareJsonSplitter()


# tool_call_format -> a splitter for one generation, given the tokenizer and the decoded prompt.
TOOL_CALL_FORMATS: dict[str, Callable[[Any, str], Splitter]] = {
    "hermes": _hermes,
    "template": _template,
    "json": _json,
}


def template_source(tokenizer: Any, chat_template: str | None) -> str:
    """The chat template's text (all named templates of a tokenizer that has several)."""
    source = chat_template if chat_template is not None else getattr(tokenizer, "chat_template", None)
    if isinstance(source, dict):
        return "\n".join(str(value) for value in source.values())
    return source or ""


def template_takes_tools(source: str) -> bool:
    """Whether a chat template reads the ``tools`` it is given."""
    return re.search(r"\btools\b", source) is not None


def has_response_template(tokenizer: Any) -> bool:
    """Whether the tokenizer ships a ``response_template`` that reads tool calls."""
    template = getattr(tokenizer, "response_template", None)
    return isinstance(template, dict) and TOOL_CALLS_FIELD in template.get("fields", {})


def detect_format(tokenizer: Any, chat_template: str | None) -> str:
    """The ``tool_call_format`` of ``auto`` (see the module docstring)."""
    if has_response_template(tokenizer):
        return "template"
    if HERMES_OPEN in template_source(tokenizer, chat_template):
        return "hermes"
    return "json"


def template_messages(messages: Sequence[ChatMessage]) -> list[dict[str, Any]]:
    """The conversation as chat templates read it (see the module docstring)."""
    shaped = []
    for message in messages:
        data = message.model_dump(mode="json", exclude_none=True)
        content = data.get("content")
        if isinstance(content, list) and all(part.get("type") == "text" for part in content):
            data["content"] = "".join(part.get("text", "") for part in content)
        elif content is None:
            data["content"] = ""
        for call in data.get("tool_calls", []):
            function = call.get("function", {})
            try:
                arguments = json.loads(function.get("arguments", ""))
            except (ValueError, RecursionError):
                continue  # not JSON: the template gets the text the request holds
            if isinstance(arguments, dict):
                function["arguments"] = arguments
        shaped.append(data)
    return shaped


class GeneratedReply:
    """One generation's reply as it streams: text through ``on_chunk`` at once, each call as one
    tool-call fragment (id, name, whole arguments) when its block completes."""

    def __init__(self, on_chunk: OnChunk, model: str, splitter: Splitter) -> None:
        self._assembler = ReplyAssembler(on_chunk, model)
        self._assembler.choice(0)
        self._splitter = splitter
        self._calls = 0

    def feed(self, text: str) -> None:
        """The next decoded piece of the answer."""
        self._emit(self._splitter.feed(text))

    def close(self) -> None:
        """Generation ended: what the splitter held back goes out."""
        self._emit(self._splitter.finish())

    def replies(self, finish_reason: str, usage: Usage) -> list[AssistantReply]:
        """The finished reply (``finish_reason`` becomes ``tool_calls`` when it calls tools)."""
        self._assembler.finish(0, finish_reason)
        self._assembler.usage(0, usage)
        return self._assembler.replies()

    def _emit(self, pieces: list[Piece]) -> None:
        for piece in pieces:
            if isinstance(piece, ParsedCall):
                self._assembler.tool_call(0, self._calls, call_id=None, name=piece.name, arguments=piece.arguments)
                self._calls += 1
            else:
                self._assembler.text(0, piece)
