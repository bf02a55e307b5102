"""Messages, content parts, tool calls and tool definitions, in OpenAI Chat Completions' shape
(the README's "Messages v2").

A reply's message (minus its ``meta``) validates as a request message, so an agent loop
appends it to the next request as it is. Part of the wire contract (``tasks.contract.schemas``
re-exports every public name); it imports nothing of Cascade's but the contract's own modules.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Sequence
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from jsonschema.exceptions import SchemaError
from jsonschema.validators import Draft202012Validator, validator_for
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator, model_validator

from tasks.contract.common import field_error

# Hard caps of the schema itself; workers apply their own (smaller, configurable) limits too.
MAX_CONTENT_CHARS = 1_000_000
MAX_CONTENT_PARTS = 256
MAX_TOOL_CALLS = 128
MAX_TOOLS = 128
MAX_IMAGE_BYTES = 20 * 1024 * 1024
MAX_IMAGE_URL_CHARS = 8192
MAX_TOOL_CALL_ID_CHARS = 512

TOOL_NAME_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
IMAGE_MIME_TYPES = ("image/png", "image/jpeg", "image/webp", "image/gif")

_DATA_URL_PREFIX = re.compile(r"data:(image/(?:png|jpeg|webp|gif));base64,")
# The longest data URL whose payload can decode to MAX_IMAGE_BYTES: longer ones are refused
# before anything is decoded.
_MAX_DATA_URL_CHARS = len("data:image/jpeg;base64,") + 4 * -(-MAX_IMAGE_BYTES // 3)

Role = Literal["system", "user", "assistant", "tool"]
ToolName = Annotated[str, Field(pattern=TOOL_NAME_PATTERN)]


def _magic_matches(mime_type: str, data: bytes) -> bool:
    """Whether ``data`` starts the way an image of ``mime_type`` does."""
    if mime_type == "image/png":
        return data.startswith(b"\x89PNG\r\n\x1a\n")
    if mime_type == "image/jpeg":
        return data.startswith(b"\xff\xd8\xff")
    if mime_type == "image/gif":
        return data.startswith((b"GIF87a", b"GIF89a"))
    return data[:4] == b"RIFF" and data[8:12] == b"WEBP"


def _decoded_size(payload: str) -> int:
    return len(payload) * 3 // 4 - payload[-2:].count("=")


class ImageUrl(BaseModel):
    """An image given by URL: ``https://...`` or ``data:image/png|jpeg|webp|gif;base64,...``."""

    model_config = ConfigDict(extra="forbid")

    url: str = Field(max_length=_MAX_DATA_URL_CHARS)
    detail: Literal["auto", "low", "high"] | None = None

    @field_validator("url")
    @classmethod
    def _check_url(cls, url: str) -> str:
        prefix = _DATA_URL_PREFIX.match(url)
        if prefix is not None:
            payload = url[prefix.end() :]
            try:
                data = base64.b64decode(payload, validate=True)
            except (binascii.Error, ValueError):
                raise ValueError("the data URL's payload is not valid base64") from None
            if not data:
                raise ValueError("the data URL holds no image")
            if len(data) > MAX_IMAGE_BYTES:
                raise ValueError(f"the image of {len(data)} bytes exceeds {MAX_IMAGE_BYTES}")
            if not _magic_matches(prefix.group(1), data):
                raise ValueError(f"the data URL's bytes are not an image of type {prefix.group(1)}")
            return url
        if url.startswith("data:"):
            types = ", ".join(IMAGE_MIME_TYPES)
            raise ValueError(f"a data URL must be data:<type>;base64,... with type one of {types}")
        parts = urlsplit(url)
        if parts.scheme != "https" or not parts.hostname:
            raise ValueError("the url must be https://... or a data:image/...;base64,... URL")
        if len(url) > MAX_IMAGE_URL_CHARS or any(char.isspace() or ord(char) < 32 for char in url):
            raise ValueError(f"the url must be at most {MAX_IMAGE_URL_CHARS} characters with no spaces")
        return url

    def data_bytes(self) -> int:
        """Size of the image a data URL holds (0 for an https URL, whose size is unknown)."""
        prefix = _DATA_URL_PREFIX.match(self.url)
        return _decoded_size(self.url[prefix.end() :]) if prefix else 0


class TextPart(BaseModel):
    """A text part of a message's content."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["text"] = "text"
    text: str = Field(max_length=MAX_CONTENT_CHARS)


class ImagePart(BaseModel):
    """An image part of a user message's content."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["image_url"] = "image_url"
    image_url: ImageUrl


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]
ContentParts = Annotated[list[ContentPart], Field(min_length=1, max_length=MAX_CONTENT_PARTS)]
_PARTS: TypeAdapter[list[TextPart | ImagePart]] = TypeAdapter(ContentParts)
_PART_TYPES = frozenset({"text", "image_url"})


class FunctionCall(BaseModel):
    """The function a tool call names, and its arguments as the JSON text the model wrote."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=256)
    arguments: str = Field(max_length=MAX_CONTENT_CHARS, description="JSON text, kept as the model wrote it")


class ToolCall(BaseModel):
    """One call of a tool by the assistant."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1, max_length=MAX_TOOL_CALL_ID_CHARS)
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    """One message of the conversation.

    ``content`` is a string, a list of parts, or null (only for an assistant message with
    ``tool_calls``). Image parts appear only in user messages; ``tool_calls`` only in assistant
    messages; a ``tool`` message answers the call named by its ``tool_call_id``.
    """

    model_config = ConfigDict(extra="forbid")

    role: Role
    content: Annotated[str, Field(max_length=MAX_CONTENT_CHARS)] | ContentParts | None = None
    tool_calls: list[ToolCall] | None = Field(default=None, min_length=1, max_length=MAX_TOOL_CALLS)
    tool_call_id: str | None = Field(default=None, min_length=1, max_length=MAX_TOOL_CALL_ID_CHARS)
    name: str | None = Field(default=None, pattern=TOOL_NAME_PATTERN)

    @field_validator("content", mode="before")
    @classmethod
    def _parse_parts(cls, content: Any) -> Any:
        # Validating the list here, rather than through the union, reports the first bad part at
        # ``content.<i>.<field>``, instead of one error per union member with the union's and
        # the part type's tags in the path.
        if not isinstance(content, list):
            if content is None or isinstance(content, str):
                return content
            field_error("ChatMessage", [], "content must be a string, a list of parts or null", content)
        try:
            return _PARTS.validate_python(content)
        except ValidationError as exc:
            first = exc.errors()[0]
            loc = list(first["loc"])
            if len(loc) >= 2 and isinstance(loc[0], int) and loc[1] in _PART_TYPES:
                del loc[1]
            field_error("ChatMessage", loc, first["msg"], first["input"])

    @model_validator(mode="after")
    def _check_role(self) -> ChatMessage:
        if self.tool_calls is not None and self.role != "assistant":
            field_error("ChatMessage", ["tool_calls"], "only an assistant message carries tool_calls")
        if self.tool_call_id is not None and self.role != "tool":
            field_error("ChatMessage", ["tool_call_id"], "only a tool message carries tool_call_id")
        if self.role == "tool" and self.tool_call_id is None:
            field_error("ChatMessage", ["tool_call_id"], "a tool message needs the tool_call_id it answers")
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            field_error("ChatMessage", ["content"], "content may be null only in an assistant message with tool_calls")
        if isinstance(self.content, list) and self.role != "user":
            for index, part in enumerate(self.content):
                if isinstance(part, ImagePart):
                    field_error("ChatMessage", ["content", index], f"a {self.role} message may not hold images")
        return self

    def text(self) -> str:
        """The message's text: its string content, or its text parts joined by newlines."""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text for part in self.content or [] if isinstance(part, TextPart))

    def text_chars(self) -> int:
        """Characters of text the message gives the model: content and tool-call arguments."""
        if isinstance(self.content, str):
            chars = len(self.content)
        else:
            chars = sum(len(part.text) for part in self.content or [] if isinstance(part, TextPart))
        return chars + sum(len(call.function.arguments) for call in self.tool_calls or [])

    def image_bytes(self) -> int:
        """Bytes of the images the message holds as data URLs."""
        return sum(url.data_bytes() for url in self.image_urls())

    def image_urls(self) -> list[ImageUrl]:
        """The message's images, in order."""
        if not isinstance(self.content, list):
            return []
        return [part.image_url for part in self.content if isinstance(part, ImagePart)]


class FunctionDefinition(BaseModel):
    """A function the model may call; ``parameters`` is the JSON Schema of its arguments."""

    model_config = ConfigDict(extra="forbid")

    name: ToolName
    description: str | None = Field(default=None, max_length=MAX_CONTENT_CHARS)
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    @field_validator("parameters")
    @classmethod
    def _parameters_are_a_schema(cls, parameters: dict[str, Any] | None) -> dict[str, Any] | None:
        if parameters is not None:
            check_json_schema(parameters)
        return parameters


class ToolDefinition(BaseModel):
    """A tool of the request (only functions exist)."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["function"] = "function"
    function: FunctionDefinition


class ToolChoiceFunction(BaseModel):
    """The function a named tool choice forces."""

    model_config = ConfigDict(extra="forbid")

    name: ToolName


class NamedToolChoice(BaseModel):
    """``tool_choice`` forcing one function: ``{type: "function", function: {name}}``."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["function"] = "function"
    function: ToolChoiceFunction


ToolChoice = Literal["auto", "none", "required"] | NamedToolChoice


class JsonSchemaFormat(BaseModel):
    """The schema a ``json_schema`` answer must validate against."""

    model_config = ConfigDict(extra="forbid", serialize_by_alias=True, validate_by_name=True)

    name: str = Field(pattern=TOOL_NAME_PATTERN)
    description: str | None = Field(default=None, max_length=MAX_CONTENT_CHARS)
    # ``schema`` would shadow a BaseModel attribute: the field is ``schema_`` in Python (which
    # also accepts it by that name) and ``schema`` on the wire, both ways.
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None

    @field_validator("schema_")
    @classmethod
    def _schema_is_a_schema(cls, schema: dict[str, Any]) -> dict[str, Any]:
        check_json_schema(schema)
        return schema


class ResponseFormat(BaseModel):
    """``{type: "text"}``, ``{type: "json_object"}`` or ``{type: "json_schema", json_schema}``."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            field_error("ResponseFormat", ["json_schema"], "type json_schema needs json_schema")
        if self.type != "json_schema" and self.json_schema is not None:
            field_error("ResponseFormat", ["json_schema"], f"type {self.type} takes no json_schema")
        return self


def check_json_schema(schema: dict[str, Any]) -> None:
    """Raise ``ValueError`` unless ``schema`` is a valid JSON Schema (of the draft its
    ``$schema`` names, 2020-12 when it names none)."""
    validator = validator_for(schema, default=Draft202012Validator)
    try:
        validator.check_schema(schema)
    except SchemaError as exc:
        where = exc.json_path if exc.json_path != "$" else "the top"
        raise ValueError(f"not a valid JSON Schema: {exc.message[:300]} (at {where})") from None


def check_tools(
    title: str, tools: Sequence[ToolDefinition] | None, tool_choice: ToolChoice | None, messages: Sequence[ChatMessage]
) -> None:
    """The checks that span fields of a request: tool names are unique, ``tool_choice`` names a
    defined tool, and each ``tool`` message answers a call of an earlier assistant message."""
    names: set[str] = set()
    for index, tool in enumerate(tools or []):
        if tool.function.name in names:
            field_error(title, ["tools", index, "function", "name"], f"duplicate tool name {tool.function.name!r}")
        names.add(tool.function.name)
    if isinstance(tool_choice, NamedToolChoice) and tool_choice.function.name not in names:
        name = tool_choice.function.name
        field_error(title, ["tool_choice", "function", "name"], f"tool_choice names {name!r}, which is not in tools")
    if tool_choice == "required" and not names:
        field_error(title, ["tool_choice"], "tool_choice 'required' needs tools")
    call_ids: set[str] = set()
    for index, message in enumerate(messages):
        if message.role == "assistant":
            call_ids.update(call.id for call in message.tool_calls or [])
        elif message.role == "tool" and message.tool_call_id not in call_ids:
            reason = f"tool_call_id {message.tool_call_id!r} answers no tool call of an earlier assistant message"
            field_error(title, ["messages", index, "tool_call_id"], reason)
