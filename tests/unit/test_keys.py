"""Cascade's own Redis keys never share a name with a request's (DESIGN.md, reliability rules).

Every module-level ``cascade:`` string constant of the product's packages is read from the
source (so a key added by any module is tried without being listed here): templates with
``{request_id}`` are per-request keys; every other key (a set, a role, a counter, a template of
another namespace) must not be any per-request key for any request id the schema accepts.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from tasks.contract import keys
from tasks.contract.schemas import REQUEST_ID_PATTERN
from worker.state import lease, pending

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("tasks", "worker", "providers", "settings")
PLACEHOLDER = "{request_id}"
REQUEST_ID = re.compile(REQUEST_ID_PATTERN)


def cascade_constants() -> dict[str, str]:
    """``module.NAME`` -> value of every module-level ``cascade:...`` string constant."""
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            for node in ast.parse(path.read_text()).body:
                targets = (
                    node.targets
                    if isinstance(node, ast.Assign)
                    else [node.target]
                    if isinstance(node, ast.AnnAssign)
                    else []
                )
                value = getattr(node, "value", None)
                if not (isinstance(value, ast.Constant) and isinstance(value.value, str)):
                    continue
                if not value.value.startswith("cascade:"):
                    continue
                for target in targets:
                    if isinstance(target, ast.Name):
                        found[f"{path.relative_to(ROOT).with_suffix('')}.{target.id}".replace("/", ".")] = value.value
    return found


CONSTANTS = cascade_constants()
TEMPLATES = {name: value for name, value in CONSTANTS.items() if PLACEHOLDER in value}
OTHERS = {name: value for name, value in CONSTANTS.items() if PLACEHOLDER not in value}


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


def test_the_scan_finds_the_keys_of_every_kind() -> None:
    values = set(CONSTANTS.values())
    assert {keys.EVENTS_STREAM, keys.REPLY, keys.PENDING_RECORD, lease.LEASE_KEY, lease.INFLIGHT_KEY} <= values
    assert {keys.DEAD_LETTERS, keys.ROUTES, pending.PENDING_SET, pending.RESENDS, pending.SWEEPER} <= values


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
