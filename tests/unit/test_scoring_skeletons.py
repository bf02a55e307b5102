"""Skeleton building (closed-book masking, evidence erasing, ``auto``) and the decision prompts."""

from __future__ import annotations

import random

import pytest

from providers.scoring import MASK_TOKEN, build_skeletons, decision_messages, erase_evidence, parse_decision
from providers.scoring.skeletons import has_evidence_section, mask_spans, maskable_spans, permute_lines

CLOSED = "Who won the 2019 Nobel Prize in Physics?"
RAG = (
    "Task: Answer strictly based on the evidence below.\n"
    "Question: Who won the Nobel Prize in Physics in 2019?\n"
    "Evidence:\n"
    "- Nobel Prize press release (2019): James Peebles (1/2); Michel Mayor & Didier Queloz (1/2).\n"
    "- The prize was awarded in Stockholm.\n"
    "Constraints: If evidence is insufficient or conflicting, refuse."
)


def test_maskable_spans_are_quotes_names_acronyms_and_numbers() -> None:
    text = "Did \"Abbey Road\" by The Beatles sell 31,000,000 copies for EMI, or didn't it in '69?"
    found = [text[start:end] for start, end in maskable_spans(text)]
    assert found == ['"Abbey Road"', "The Beatles", "31,000,000", "EMI", "69"]


def test_mask_levels_round_up_and_grow() -> None:
    # Three spans: level 0.25 masks ceil(0.75) = 1, 0.5 masks ceil(1.5) = 2, 0.9 masks 3.
    text = "Ada Lovelace met Charles Babbage in 1833."
    assert len(maskable_spans(text)) == 3
    for level, masked in ((0.25, 1), (0.5, 2), (0.9, 3)):
        assert mask_spans(text, level, random.Random(0)).count(MASK_TOKEN) == masked
    assert mask_spans(text, 0.0, random.Random(0)) == text
    assert mask_spans("nothing to hide here", 0.9, random.Random(0)) == "nothing to hide here"


def test_closed_book_skeletons_mask_progressively_and_reproducibly() -> None:
    skeletons = build_skeletons(CLOSED, 6, "closed_book")
    assert skeletons.policy == "closed_book" and skeletons.closed_book
    assert len(skeletons.prompts) == 6
    # Two spans ("2019", "Nobel Prize"): levels 0.25, 0.35, 0.5 mask one; 0.65, 0.8, 0.9 both.
    assert [p.count(MASK_TOKEN) for p in skeletons.prompts] == [1, 1, 1, 2, 2, 2]
    assert skeletons.prompts[5] == f"Who won the {MASK_TOKEN} {MASK_TOKEN} in Physics?"
    assert build_skeletons(CLOSED, 6, "closed_book") == skeletons
    # m above the six levels cycles them.
    assert [p.count(MASK_TOKEN) for p in build_skeletons(CLOSED, 8, "closed_book").prompts][6:] == [1, 1]


def test_evidence_erase_removes_the_whole_section_and_keeps_the_rest() -> None:
    erased = erase_evidence(RAG)
    assert erased == (
        "Task: Answer strictly based on the evidence below.\n"
        "Question: Who won the Nobel Prize in Physics in 2019?\n"
        f"Evidence: {MASK_TOKEN}\n"
        "Constraints: If evidence is insufficient or conflicting, refuse."
    )
    skeletons = build_skeletons(RAG, 4, "evidence_erase")
    assert skeletons.policy == "evidence_erase" and not skeletons.closed_book
    for prompt in skeletons.prompts:
        # Each skeleton is the erased prompt with its lines after the first permuted.
        assert prompt.splitlines()[0] == erased.splitlines()[0]
        assert sorted(prompt.splitlines()) == sorted(erased.splitlines())
        assert "Peebles" not in prompt and "Stockholm" not in prompt


def test_evidence_erase_handles_inline_json_and_tagged_evidence() -> None:
    assert erase_evidence("Q: who?\nContext: Marie Curie won twice.") == f"Q: who?\nContext: {MASK_TOKEN}"
    assert erase_evidence('{"question": "who?", "evidence": "Curie \\"won\\" twice"}') == (
        f'{{"question": "who?", "evidence": "{MASK_TOKEN}"}}'
    )
    assert erase_evidence("who?\n<context>\nCurie won twice.\n</context>") == f"who?\n<context>{MASK_TOKEN}</context>"


def test_auto_picks_the_policy_from_the_prompt() -> None:
    assert has_evidence_section(RAG) and not has_evidence_section(CLOSED)
    assert build_skeletons(RAG, 2, "auto").policy == "evidence_erase"
    assert build_skeletons(CLOSED, 2, "auto").policy == "closed_book"
    with pytest.raises(ValueError, match="m must be at least 1"):
        build_skeletons(CLOSED, 0, "auto")


def test_permute_lines_keeps_the_first_line_and_every_line() -> None:
    text = "head\na\nb\nc\nd"
    for seed in range(5):
        permuted = permute_lines(text, seed)
        assert permuted.splitlines()[0] == "head"
        assert sorted(permuted.splitlines()) == sorted(text.splitlines())
    assert len({permute_lines(text, seed) for seed in range(10)}) > 1
    assert permute_lines("one line", 3) == "one line"


def test_decision_messages_by_policy() -> None:
    closed = decision_messages("  Who won?  ", closed_book=True)
    evidence = decision_messages("Who won?", closed_book=False)
    assert [m["role"] for m in closed] == ["system", "user"]
    assert "own knowledge" in closed[0]["content"] and MASK_TOKEN in closed[0]["content"]
    assert "evidence" in evidence[0]["content"]
    assert closed[1]["content"].startswith("Who won?\n\n")
    assert "ANSWER" in closed[1]["content"] and "REFUSE" in closed[1]["content"]


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ("ANSWER", "answer"),
        ("answer.", "answer"),
        ("**REFUSE**", "refuse"),
        (" Refuse\n", "refuse"),
        ('{"decision": "answer"}', "answer"),
        ('```json\n{"decision":"refuse"}\n```', "refuse"),
        ("I would answer this.", "answer"),
        ("I cannot answer that reliably.", "refuse"),
        ("I can't answer.", "refuse"),
        ("I must abstain.", "refuse"),
        ("Answer - I know this one", "answer"),
        ("Either answer or refuse", "refuse"),
        ("Paris", "refuse"),
        ("", "refuse"),
    ],
)
def test_parse_decision(reply: str, expected: str) -> None:
    assert parse_decision(reply) == expected
