"""The decision prompts (answer or refuse?) sent for each sample, and reading their replies.

The decision head asks the model whether it would answer the prompt, not for the answer itself,
so a reply is one word and ``DECISION_MAX_TOKENS`` bounds its cost. The closed-book head asks
the model to rely on its own knowledge and to refuse when the prompt looks redacted; the
evidence head asks it to rely on the prompt's evidence alone.
"""

from __future__ import annotations

import json
import re
from typing import Literal, TypedDict

from providers.scoring.edfl import DecisionLabel
from providers.scoring.skeletons import MASK_TOKEN

DECISION_MAX_TOKENS = 8

_CLOSED_BOOK_SYSTEM = (
    "You decide whether a request can be answered reliably; you do not answer it. "
    "There is no external evidence: judge from your own knowledge and the request alone. "
    f"If parts of the request are redacted (shown as {MASK_TOKEN}), key details look missing, "
    "or you are not reasonably confident you would answer correctly, refuse."
)
_EVIDENCE_SYSTEM = (
    "You decide whether a request can be answered reliably; you do not answer it. "
    "Judge only from the evidence or context given in the request. If that evidence is "
    f"missing, redacted (shown as {MASK_TOKEN}), insufficient or conflicting, refuse."
)
_INSTRUCTION = (
    "\n\nDo not answer the request above. Reply with exactly one word: "
    "ANSWER if you would answer it, REFUSE if you would not."
)


class DecisionMessage(TypedDict):
    """One chat message of a decision prompt (the shape of ``tasks.contract.schemas.ChatMessage``)."""

    role: Literal["system", "user"]
    content: str


def decision_messages(prompt: str, closed_book: bool) -> list[DecisionMessage]:
    """The system and user messages that ask for one ANSWER/REFUSE decision on ``prompt``."""
    system = _CLOSED_BOOK_SYSTEM if closed_book else _EVIDENCE_SYSTEM
    return [
        {"role": "system", "content": system},
        {"role": "user", "content": prompt.strip() + _INSTRUCTION},
    ]


_ANSWER_WORDS = frozenset({"answer", "answers", "answered", "answering"})
_REFUSE_WORDS = frozenset({"refuse", "refuses", "refused", "refusal", "abstain", "decline"})
_WORD = re.compile(r"[a-z]+")
_NEGATED_ANSWER = re.compile(
    r"\b(?:cannot|can[’']?t|can not|won[’']?t|will not|unable to|not|don[’']?t|do not|"  # noqa: RUF001 - typographic apostrophes occur in replies
    r"shouldn[’']?t|should not|never|no)\s+(?:be\s+)?answer",  # noqa: RUF001
    re.IGNORECASE,
)
_JSON_DECISION = re.compile(r'"decision"\s*:\s*"\s*(answer|refuse)\s*"', re.IGNORECASE)


def _json_decision(text: str) -> DecisionLabel | None:
    try:
        parsed = json.loads(text)
    except ValueError:
        parsed = None
    if isinstance(parsed, dict):
        value = str(parsed.get("decision", "")).strip().lower()
        if value == "answer":
            return "answer"
        if value == "refuse":
            return "refuse"
    match = _JSON_DECISION.search(text)
    if match is not None:
        return "answer" if match.group(1).lower() == "answer" else "refuse"
    return None


def parse_decision(text: str) -> DecisionLabel:
    """Read a decision reply as ``answer`` or ``refuse``.

    In order: a JSON ``{"decision": ...}``; the reply's first word; a negated "answer"
    ("cannot answer") reads as ``refuse``; otherwise the one decision word the reply contains.
    An empty, unreadable or ambiguous reply reads as ``refuse``, the cautious default.
    """
    from_json = _json_decision(text.strip())
    if from_json is not None:
        return from_json
    words = _WORD.findall(text.lower())
    if not words:
        return "refuse"
    if words[0] in _ANSWER_WORDS:
        return "answer"
    if words[0] in _REFUSE_WORDS:
        return "refuse"
    if _NEGATED_ANSWER.search(text) is not None:
        return "refuse"
    said_answer = any(w in _ANSWER_WORDS for w in words)
    said_refuse = any(w in _REFUSE_WORDS for w in words)
    return "answer" if said_answer and not said_refuse else "refuse"
