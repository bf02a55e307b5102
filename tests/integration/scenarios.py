"""The scripted providers and named chains every integration scenario needs, and the texts
they answer with. All of them are fast (a few milliseconds per request) unless named slow."""

from __future__ import annotations

from typing import Any

STEADY_TEXT = "The quick brown fox jumps over the lazy dog."
BACKUP_TEXT = "Backup answer from the second provider."
PRIMARY_TEXT = "The first provider answered after all."
CUT_TEXT = "This answer is cut off after three chunks and never finishes."
DRIBBLE_TEXT = "Slowly, slowly, one small piece at a time, the answer trickles out."

TRANSIENT_KINDS = ("rate_limit", "timeout", "server_error", "overloaded", "connection_error")
FATAL_KINDS = ("auth", "unknown_model", "context_length", "content_filter", "bad_request")
# The error_type each scripted failure is reported with (the taxonomy's codes).
ERROR_TYPE = {
    "rate_limit": "rate_limited",
    "timeout": "timeout",
    "server_error": "server_error",
    "overloaded": "overloaded",
    "connection_error": "connection_error",
    "auth": "auth",
    "unknown_model": "unknown_model",
    "context_length": "context_length",
    "content_filter": "content_filter",
    "bad_request": "bad_request",
    "cut": "stream_interrupted",
}

# Worker limits set through the environment, so bad-input tests can exceed them cheaply.
MAX_MESSAGES = 8
MAX_INPUT_CHARS = 20_000

_FAST: dict[str, Any] = {"chunk_size": 4, "first_chunk_delay_ms": 0, "chunk_delay_ms": 1}
_RETRY: dict[str, Any] = {"max_retries": 2, "backoff_initial_s": 0.01, "backoff_max_s": 0.05, "retry_after_s": 0.05}


def provider_table() -> dict[str, dict[str, Any]]:
    """Every scripted provider the scenarios need (fast: a few ms per request)."""
    providers: dict[str, dict[str, Any]] = {
        "steady": {"type": "scripted", "text": STEADY_TEXT, **_FAST},
        "backup": {"type": "scripted", "text": BACKUP_TEXT, "model": "scripted-backup", **_FAST},
        # 429 whose Retry-After is longer than the provider accepts: no retry, fall through.
        "long_retry_after": {
            "type": "scripted",
            "text": PRIMARY_TEXT,
            "fail": "rate_limit",
            **_FAST,
            **_RETRY,
            "retry_after_s": 60.0,
            "retry_after_max_s": 1.0,
        },
        # Down for good: trips its cooldown after 2 failures within a minute.
        "outage": {
            "type": "scripted",
            "text": PRIMARY_TEXT,
            "fail": "server_error",
            "max_retries": 0,
            "cooldown_failures": 2,
            "cooldown_window_s": 60,
            "cooldown_s": 30,
            **_FAST,
        },
        # Fails after 3 chunks (cut connection), every time.
        "cutter": {"type": "scripted", "text": CUT_TEXT, "fail": "cut", "fail_after_chunks": 3, **_FAST},
        # Streams all of its text, then the stream ends without its end marker.
        "no_end_marker": {"type": "scripted", "text": PRIMARY_TEXT, "fail": "cut", "fail_after_chunks": 99, **_FAST},
        # Takes 3 s before its first chunk: slower than the deadlines and soft limit under test.
        "slow_start": {"type": "scripted", "text": STEADY_TEXT, **_FAST, "first_chunk_delay_ms": 3000},
        # About 33 chunks, 40 ms apart: long enough to join mid-stream or cancel.
        "dribble": {"type": "scripted", "text": DRIBBLE_TEXT, "chunk_size": 2, "chunk_delay_ms": 40},
    }
    for kind in TRANSIENT_KINDS:
        providers[f"flaky_{kind}"] = {"type": "scripted", "text": PRIMARY_TEXT, "fail": kind, "fail_times": 1}
        providers[f"flaky_{kind}"].update({**_FAST, **_RETRY})
        providers[f"always_{kind}"] = {"type": "scripted", "text": PRIMARY_TEXT, "fail": kind, **_FAST, **_RETRY}
    for kind in FATAL_KINDS:
        providers[f"fatal_{kind}"] = {"type": "scripted", "text": PRIMARY_TEXT, "fail": kind, **_FAST, **_RETRY}
    return providers


def chain_table() -> dict[str, list[str]]:
    """A named chain per scenario."""
    chains: dict[str, list[str]] = {
        "default": ["steady"],
        "backup_only": ["backup"],
        "retry_after_too_long": ["long_retry_after", "backup"],
        "cooldown": ["outage", "backup"],
        "cut": ["cutter", "backup"],
        "no_end_marker": ["no_end_marker", "backup"],
        "all_fail": ["fatal_auth", "always_server_error", "fatal_context_length"],
        "deadline": ["slow_start", "backup"],
        "dribble": ["dribble"],
    }
    for kind in TRANSIENT_KINDS:
        chains[f"transient_{kind}"] = [f"flaky_{kind}", "backup"]
        chains[f"exhaust_{kind}"] = [f"always_{kind}", "backup"]
    for kind in FATAL_KINDS:
        chains[f"fatal_{kind}"] = [f"fatal_{kind}", "backup"]
    return chains
