"""What a request needs of a provider, and of its answer (DESIGN.md, "Messages v2").

``needs_of`` reads a call: tools (the request offers tools, or its conversation holds tool calls
or tool results), images (a user message holds an image part), a JSON schema
(``response_format`` ``json_schema``), several choices (``n`` > 1). ``missing`` says which of
them a provider's capabilities lack: the chain skips such a provider.

``OutputCheck`` checks the answers of a call that asked for JSON: each reply that calls no
tool must hold a JSON object (``json_object``) or a JSON value valid against the schema
(``json_schema``, validated with ``jsonschema``); anything else is ``InvalidOutput``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from jsonschema.exceptions import best_match
from jsonschema.protocols import Validator
from jsonschema.validators import Draft202012Validator, validator_for

from providers import errors
from providers.base import ProviderCall
from settings.providers import Capabilities
from tasks.contract.schemas import AssistantReply, ResponseFormat


@dataclass(frozen=True)
class Needs:
    """What a call needs of the provider that takes it."""

    tools: bool = False
    images: bool = False
    json_schema: bool = False
    n: bool = False

    def missing(self, capabilities: Capabilities) -> list[str]:
        """The needs ``capabilities`` lack, by name (empty when the provider can take the call)."""
        lacking = []
        if self.tools and not capabilities.tools:
            lacking.append("tools")
        if self.images and not capabilities.images:
            lacking.append("images")
        if self.json_schema and not capabilities.json_schema:
            lacking.append("json_schema")
        if self.n and not capabilities.n:
            lacking.append("n > 1")
        return lacking


def needs_of(call: ProviderCall) -> Needs:
    """What ``call`` needs (see the module docstring)."""
    speaks_of_tools = any(message.tool_calls or message.role == "tool" for message in call.messages)
    return Needs(
        tools=bool(call.tools) or speaks_of_tools,
        images=any(message.image_urls() for message in call.messages),
        json_schema=call.response_format is not None and call.response_format.type == "json_schema",
        n=call.choices > 1,
    )


class OutputCheck:
    """The check of a call's answers against its ``response_format`` (none for ``text``)."""

    def __init__(self, response_format: ResponseFormat | None) -> None:
        self._type = response_format.type if response_format is not None else "text"
        self._validator: Validator | None = None
        if response_format is not None and response_format.json_schema is not None:
            schema = response_format.json_schema.schema_
            self._validator = validator_for(schema, default=Draft202012Validator)(schema)

    @property
    def active(self) -> bool:
        """True when answers are checked at all."""
        return self._type != "text"

    def check(self, provider_id: str, replies: Sequence[AssistantReply]) -> None:
        """Raise ``InvalidOutput`` naming the first reply (by its index) that fails the check."""
        if not self.active:
            return
        for reply in replies:
            if reply.tool_calls:
                continue  # a reply that calls tools is not the answer yet
            problem = self._problem(reply.content or "")
            if problem is not None:
                index = reply.meta.index
                raise errors.InvalidOutput(f"{provider_id}: reply {index} is not valid {self._type}: {problem}")

    def _problem(self, text: str) -> str | None:
        try:
            value: Any = json.loads(text)
        except json.JSONDecodeError as exc:
            return f"not JSON ({exc.msg} at character {exc.pos})"
        except (ValueError, RecursionError):  # nested deeper than the parser goes
            return "not JSON"
        if self._validator is None:
            return None if isinstance(value, dict) else f"a JSON {type(value).__name__}, not an object"
        error = best_match(self._validator.iter_errors(value))
        if error is None:
            return None
        where = error.json_path if error.json_path != "$" else "the top"
        return f"{error.message[:300]} (at {where})"
