"""The ``scripted`` provider: deterministic replies at a configured pace, failing on request.

It is a real provider, used by ``make demo``, load tests and benchmarks: it replays ``text``
in chunks of ``chunk_size`` characters, waits ``first_chunk_delay_ms`` before the first and
``chunk_delay_ms`` between the others, and honours the request's deadline, cancel and
``max_tokens`` (one chunk counts as one token). Told to ``fail``, it fails the way a real
provider does; ``fail_times = N`` makes it fail the first N calls of each request, then succeed.
``fail = "crash"`` ends the whole process mid-call (``os._exit``), as an OOM kill or a segfault
would: after ``fail_after_chunks`` chunks (like ``cut``), or before any chunk when that is 0.

With ``tool_calls`` configured, a request that offers tools (and whose last message is not a
tool result: the loop's next turn gets the text; an entry with no text always calls) is
answered with those calls instead of the text, finish_reason ``tool_calls``: each call's
arguments stream as fragments of ``chunk_size`` characters, its first fragment with its id and
name. With ``n`` > 1 every choice
streams the same answer under its own index, a piece of each in turn; usage is per reply.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import NoReturn

from providers import errors
from providers.base import ChatProvider, OnChunk, ProviderCall
from providers.replies import ReplyAssembler
from settings.providers import ScriptedConfig
from tasks.contract.schemas import AssistantReply, Usage

logger = logging.getLogger(__name__)

# The exit status of a ``crash``: what a process killed by the kernel's OOM killer reports
# (128 + SIGKILL) to a parent that reads it as an exit code.
CRASH_EXIT_CODE = 137
# Failures that come after some chunks: the text streams up to ``fail_after_chunks`` first.
_MID_STREAM = frozenset({"cut", "crash"})

_FAILURES: dict[str, type[errors.ProviderError]] = {
    "rate_limit": errors.RateLimited,
    "timeout": errors.ProviderTimeout,
    "server_error": errors.ServerError,
    "overloaded": errors.Overloaded,
    "connection_error": errors.ProviderConnectionError,
    "auth": errors.AuthenticationFailed,
    "unknown_model": errors.UnknownModel,
    "context_length": errors.ContextLengthExceeded,
    "content_filter": errors.ContentFiltered,
    "bad_request": errors.BadProviderRequest,
    "cut": errors.StreamInterrupted,
}


class ScriptedProvider(ChatProvider):
    """Replays configured text; see the module docstring for the knobs."""

    config: ScriptedConfig

    def __init__(self, provider_id: str, config: ScriptedConfig) -> None:
        super().__init__(provider_id, config)
        self.config = config

    def run(self, call: ProviderCall, on_chunk: OnChunk) -> list[AssistantReply]:
        """Stream the scripted text (or fail as configured)."""
        cfg = self.config
        started = time.monotonic()
        give_up_at = min(started + cfg.timeout_s, call.deadline)
        failing = cfg.fail is not None and (cfg.fail_times is None or call.provider_attempt <= cfg.fail_times)
        if failing and (cfg.fail not in _MID_STREAM or (cfg.fail == "crash" and cfg.fail_after_chunks == 0)):
            self._pace(call, cfg.fail_delay_ms / 1000, give_up_at)
            raise self._failure()

        pieces = self._pieces(call)
        finish_reason = "tool_calls" if pieces and isinstance(pieces[0], tuple) else "stop"
        max_tokens = call.generation_kwargs.get("max_tokens")
        if finish_reason == "stop" and isinstance(max_tokens, int) and max_tokens < len(pieces):
            pieces, finish_reason = pieces[:max_tokens], "length"

        assembler = ReplyAssembler(on_chunk, cfg.model)
        for number, piece in enumerate(pieces):
            if failing and number >= cfg.fail_after_chunks:
                raise self._failure()
            delay_ms = cfg.first_chunk_delay_ms if number == 0 else cfg.chunk_delay_ms
            limit = give_up_at
            if number == 0 and cfg.first_chunk_timeout_s is not None:
                limit = min(limit, started + cfg.first_chunk_timeout_s)
            self._pace(call, delay_ms / 1000, limit)
            for index in range(call.choices):
                if number == len(pieces) - 1:
                    assembler.finish(index, finish_reason)
                if isinstance(piece, str):
                    assembler.text(index, piece)
                else:
                    call_index, fragment = piece
                    tool = cfg.tool_calls[call_index]
                    assembler.tool_call(index, call_index, call_id=tool.id, name=tool.name, arguments=fragment)
        if failing:  # "cut" with fail_after_chunks beyond the text: the end marker never came
            raise self._failure()

        prompt_tokens = sum(len(message.text().split()) for message in call.messages)
        usage = Usage(
            prompt_tokens=prompt_tokens,
            completion_tokens=len(pieces),
            total_tokens=prompt_tokens + len(pieces),
        )
        for index in range(call.choices):
            assembler.finish(index, finish_reason)
            assembler.usage(index, usage)
        return assembler.replies()

    def _pieces(self, call: ProviderCall) -> list[str | tuple[int, str]]:
        """The answer in the pieces it streams in: the text's, or the tool calls' fragments
        (each a call's position and a piece of its arguments)."""
        cfg, size = self.config, self.config.chunk_size
        last_is_result = bool(call.messages) and call.messages[-1].role == "tool"
        if not (cfg.tool_calls and call.offers_tools and not last_is_result) and cfg.text:
            return [cfg.text[i : i + size] for i in range(0, len(cfg.text), size)]
        fragments: list[str | tuple[int, str]] = []
        for call_index, tool in enumerate(cfg.tool_calls):
            arguments = tool.arguments if isinstance(tool.arguments, str) else json.dumps(tool.arguments)
            fragments += [(call_index, arguments[i : i + size]) for i in range(0, len(arguments), size)] or [
                (call_index, "")
            ]
        return fragments

    def _crash(self) -> NoReturn:
        """End this process now, with no cleanup, as the kernel would."""
        logger.error("%s: scripted crash: this process exits now (%d)", self.provider_id, CRASH_EXIT_CODE)
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        os._exit(CRASH_EXIT_CODE)

    def _pace(self, call: ProviderCall, seconds: float, give_up_at: float) -> None:
        """Wait ``seconds``, or time out like a real provider if that passes ``give_up_at``."""
        if seconds <= 0:
            return
        if time.monotonic() + seconds > give_up_at:
            call.wait(max(0.0, give_up_at - time.monotonic()))
            if give_up_at >= call.deadline:
                call.wait(0.01)  # let the request's own deadline fire first: it is not our failure
            raise errors.ProviderTimeout(f"{self.provider_id}: no chunk within the provider's timeout")
        call.wait(seconds)

    def _failure(self) -> errors.ProviderError:
        kind = self.config.fail or "server_error"
        if kind == "crash":
            self._crash()
        error_class = _FAILURES[kind]
        message = f"{self.provider_id}: scripted failure {kind}"
        if error_class is errors.RateLimited:
            return errors.RateLimited(message, retry_after_s=self.config.retry_after_s)
        if error_class is errors.ServerError:
            return errors.ServerError(message, status_code=503)
        return error_class(message)
