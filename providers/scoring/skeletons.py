"""Skeletons: the weakened prompts whose decisions make the EDFL priors.

Two policies, as in the EDFL toolkit (``leochlon/hallbayes``, README "Two Ways to Build Rolling
Priors"):

- ``closed_book`` (semantic masking): the maskable spans of the prompt (quoted spans,
  multi-word capitalised names, acronyms, numbers and years) are replaced by ``MASK_TOKEN``.
  Skeleton ``k`` masks the fraction ``MASK_LEVELS[k mod 6]`` of them (rounded up, so at least
  one), so the ensemble runs from lightly to heavily masked.
- ``evidence_erase``: the labelled evidence section (``Evidence:``, ``Context:``, ...: the rest
  of the label's line and every line up to the next ``Label:`` line), a JSON string field of
  such a name, or an ``<evidence>``-style element is replaced by ``MASK_TOKEN``.

In both, skeleton ``k`` then permutes the prompt's lines after the first with seed ``k`` (the
permutation mixture of the paper: priors averaged over orderings), keeping the first line, which
usually states the task, in place. Everything is seeded by ``k``, so skeletons are reproducible.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass
from typing import Literal

from providers.scoring.config import SkeletonPolicy

# The toolkit's redaction mark: a bracketed ellipsis a model reads as "something was elided here".
MASK_TOKEN = "[…]"  # noqa: S105 - a redaction mark, not a credential
MASK_LEVELS = (0.25, 0.35, 0.5, 0.65, 0.8, 0.9)
EVIDENCE_LABELS = (
    "Evidence",
    "Context",
    "Citations",
    "References",
    "Notes",
    "Passage",
    "Snippet",
    "Sources",
    "Documents",
)

_LABELS = "|".join(EVIDENCE_LABELS)
_SPAN = re.compile(
    r'"[^"\n]+"'  # double-quoted
    r"|“[^”\n]+”"  # typographic quotes
    r"|(?<!\w)'[^'\n]+'(?!\w)"  # single-quoted, not an apostrophe
    r"|\b[A-Z][\w'-]*(?:[ \t]+[A-Z][\w'-]*)+"  # multi-word capitalised names
    r"|\b[A-Z]{2,}\b"  # acronyms
    r"|\b\d+(?:[.,:/]\d+)*\b"  # numbers, years, dates, times
)
# A label line: "Label:" at the start of a line (no bullet), e.g. "Question:", "Evidence:".
_LABEL_LINE = re.compile(r"^[ \t#*]*[A-Z][A-Za-z ]{0,40}:")
_EVIDENCE_LINE = re.compile(rf"^(?P<head>[ \t#*]*(?:{_LABELS})\b[^:\n]{{0,40}}:)", re.IGNORECASE)
_EVIDENCE_LINE_ANYWHERE = re.compile(_EVIDENCE_LINE.pattern, re.IGNORECASE | re.MULTILINE)
_EVIDENCE_JSON = re.compile(rf'(?P<head>"(?:{_LABELS})"\s*:\s*)"(?:[^"\\]|\\.)*"', re.IGNORECASE)
_EVIDENCE_TAG = re.compile(rf"<(?P<tag>{_LABELS})>.*?</(?P=tag)>", re.IGNORECASE | re.DOTALL)


@dataclass(frozen=True)
class Skeletons:
    """The skeleton prompts and the policy that made them (``auto`` resolved)."""

    prompts: tuple[str, ...]
    policy: Literal["closed_book", "evidence_erase"]

    @property
    def closed_book(self) -> bool:
        """Whether the decision prompts should be the closed-book ones."""
        return self.policy == "closed_book"


def maskable_spans(text: str) -> list[tuple[int, int]]:
    """The ``(start, end)`` of each span closed-book masking may hide, left to right."""
    return [match.span() for match in _SPAN.finditer(text)]


def mask_spans(text: str, level: float, rng: random.Random) -> str:
    """``text`` with ``ceil(level * N)`` of its ``N`` maskable spans, chosen by ``rng``, masked."""
    spans = maskable_spans(text)
    if not spans or level <= 0.0:
        return text
    count = min(len(spans), math.ceil(level * len(spans)))
    chosen = sorted(rng.sample(range(len(spans)), count), reverse=True)
    for index in chosen:
        start, end = spans[index]
        text = text[:start] + MASK_TOKEN + text[end:]
    return text


def has_evidence_section(text: str) -> bool:
    """Whether ``text`` has a labelled evidence section that ``erase_evidence`` would erase."""
    return any(pattern.search(text) is not None for pattern in (_EVIDENCE_LINE_ANYWHERE, _EVIDENCE_JSON, _EVIDENCE_TAG))


def erase_evidence(text: str) -> str:
    """``text`` with each labelled evidence section's content replaced by ``MASK_TOKEN``."""
    text = _EVIDENCE_TAG.sub(lambda m: f"<{m.group('tag')}>{MASK_TOKEN}</{m.group('tag')}>", text)
    text = _EVIDENCE_JSON.sub(lambda m: f'{m.group("head")}"{MASK_TOKEN}"', text)
    out: list[str] = []
    erasing = False
    for line in text.splitlines():
        evidence = _EVIDENCE_LINE.match(line)
        if evidence is not None:
            out.append(f"{evidence.group('head')} {MASK_TOKEN}")
            erasing = True
        elif _LABEL_LINE.match(line) is not None:
            out.append(line)
            erasing = False
        elif not erasing:
            out.append(line)
    return "\n".join(out)


def permute_lines(text: str, seed: int) -> str:
    """``text`` with its non-blank lines after the first shuffled by ``seed``."""
    lines = [line for line in text.splitlines() if line.strip()]
    if len(lines) < 3:
        return text
    head, body = lines[0], lines[1:]
    random.Random(seed).shuffle(body)
    return "\n".join([head, *body])


def resolve_policy(prompt: str, policy: SkeletonPolicy) -> Literal["closed_book", "evidence_erase"]:
    """``auto`` becomes ``evidence_erase`` when the prompt has an evidence section, else ``closed_book``."""
    if policy == "auto":
        return "evidence_erase" if has_evidence_section(prompt) else "closed_book"
    return policy


def build_skeletons(prompt: str, m: int, policy: SkeletonPolicy) -> Skeletons:
    """The ``m`` skeletons of ``prompt`` under ``policy``."""
    if m < 1:
        raise ValueError("m must be at least 1")
    resolved = resolve_policy(prompt, policy)
    prompts: list[str] = []
    erased = erase_evidence(prompt) if resolved == "evidence_erase" else prompt
    for k in range(m):
        if resolved == "closed_book":
            weakened = mask_spans(prompt, MASK_LEVELS[k % len(MASK_LEVELS)], random.Random(k))
        else:
            weakened = erased
        prompts.append(permute_lines(weakened, seed=k))
    return Skeletons(prompts=tuple(prompts), policy=resolved)
