"""Cascade's own Redis keys never share a name with a request's (DESIGN.md, reliability rules).

Every key name lives in ``tasks.contract.keys``: its ``cascade:`` constants are read from the
module (so a key added there is tried without being listed here): templates with
``{request_id}`` are per-request keys; every other key (a set, a role, a counter, a template of
another namespace) must not be any per-request key for any request id the schema accepts. The
source of the product's packages is scanned too: a ``cascade:`` key name written anywhere else
fails.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from tasks.contract import keys
from tasks.contract.schemas import REQUEST_ID_PATTERN

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("tasks", "worker", "providers", "settings")
KEYS_MODULE = ROOT / "tasks" / "contract" / "keys.py"
PLACEHOLDER = "{request_id}"
REQUEST_ID = re.compile(REQUEST_ID_PATTERN)
# A key name: ``cascade:`` and no space after it (``"cascade: bad config"`` is a message).
KEY_NAME = re.compile(r"^cascade:\S")

CONSTANTS = {
    name: value
    for name, value in vars(keys).items()
    if name.isupper() and isinstance(value, str) and value.startswith("cascade:")
}
TEMPLATES = {name: value for name, value in CONSTANTS.items() if PLACEHOLDER in value}
OTHERS = {name: value for name, value in CONSTANTS.items() if PLACEHOLDER not in value}


def key_names_in(source: str) -> list[tuple[int, str]]:
    """(line, text) of every string literal of ``source`` that names a ``cascade:`` key."""
    return [
        (node.lineno, node.value)
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and KEY_NAME.match(node.value)
    ]


def stray_key_names() -> list[str]:
    """``path:line: text`` of every key name written outside the keys module."""
    found = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if path != KEYS_MODULE:
                found += [f"{path.relative_to(ROOT)}:{n}: {text[:60]}" for n, text in key_names_in(path.read_text())]
    return found


def request_id_making(template: str, key: str) -> str | None:
    """A request id ``x`` for which ``template.format(request_id=x)`` could equal ``key`` (for
    a ``key`` with placeholders of its own, its literal head is matched against the template's
    head); None if there is none."""
    prefix, suffix = template.split(PLACEHOLDER)
    literal = key.split("{", 1)[0]
    if literal != key:  # a template of another namespace: compare the fixed heads
        if literal.startswith(prefix):
            head = literal[len(prefix) :]
            return head if head == "" or REQUEST_ID.match(head + "x") else None
        return "x" if prefix.startswith(literal) else None
    if not (key.startswith(prefix) and key.endswith(suffix)) or len(key) < len(prefix) + len(suffix):
        return None
    middle = key[len(prefix) : len(key) - len(suffix)]
    return middle if REQUEST_ID.match(middle) else None


def test_the_keys_of_every_kind_are_read() -> None:
    assert {keys.EVENTS_STREAM, keys.REPLY, keys.PENDING_RECORD, keys.LEASE, keys.INFLIGHT_RECORD} <= set(
        TEMPLATES.values()
    )
    assert {keys.DEAD_LETTERS, keys.ROUTES, keys.PENDING_SET, keys.RESENDS, keys.SWEEPER} <= set(OTHERS.values())
    assert {keys.COOLDOWN, keys.COOLDOWN_FAILURES, keys.INFLIGHT_SET} <= set(OTHERS.values())


def test_no_key_name_is_written_outside_the_keys_module() -> None:
    assert stray_key_names() == []


def test_the_scan_sees_a_stray_key_name() -> None:
    source = '''"""Docs about ``cascade:dead``."""
LEASE = "cascade:lease:{request_id}"
def f(rid):
    print("cascade: a message")
    return f"cascade:x:{rid}"
'''
    assert key_names_in(source) == [(2, "cascade:lease:{request_id}"), (5, "cascade:x:")]
    assert len(key_names_in(KEYS_MODULE.read_text())) == len(CONSTANTS)


def test_the_check_sees_a_collision() -> None:
    assert request_id_making("cascade:pending:{request_id}", "cascade:pending:sweeper") == "sweeper"
    assert request_id_making("cascade:pending:{request_id}", "cascade:pending") is None
    assert request_id_making("cascade:lease:{request_id}", "cascade:lease:x{provider_id}") == "x"
    assert request_id_making("cascade:lease:{request_id}", "cascade:lease:x:{provider_id}") is None  # no ':' in ids


@pytest.mark.parametrize("template_name", sorted(TEMPLATES))
def test_no_reserved_key_is_a_request_key(template_name: str) -> None:
    template = TEMPLATES[template_name]
    for name, key in OTHERS.items():
        request_id = request_id_making(template, key)
        assert request_id is None, f"request id {request_id!r} makes {template_name} the key {name} ({key})"


@pytest.mark.parametrize("template_name", sorted(TEMPLATES))
def test_two_request_keys_never_meet(template_name: str) -> None:
    template = TEMPLATES[template_name]
    for name, other in TEMPLATES.items():
        if other != template:
            assert request_id_making(template, other) is None, f"{template_name} and {name} can meet"
