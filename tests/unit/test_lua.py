"""Every Lua script in one module (worker/state/lua.py), each with named KEYS and ARGV: a call
names every key and argument or is refused, runs by SHA once Redis knows the script, and every
body reads its keys and arguments by name."""

from __future__ import annotations

import fakeredis
import pytest

from worker.state import lua

ECHO = lua.Script(
    "echo",
    keys=("first_key", "second_key"),
    args=("greeting",),
    rest="extras",
    body="return {first_key, second_key, greeting, #ARGV - extras_from + 1}",
)


def test_the_names_become_lua_locals() -> None:
    assert ECHO.source.splitlines()[:4] == [
        "local first_key = KEYS[1]",
        "local second_key = KEYS[2]",
        "local greeting = ARGV[1]",
        "local extras_from = 2",
    ]


def test_a_call_by_name_runs_by_text_once_then_by_sha(fake_redis: fakeredis.FakeRedis) -> None:
    commands: list[str] = []
    real_execute = fake_redis.execute_command

    def recording(*args: object, **options: object) -> object:
        commands.append(str(args[0]))
        return real_execute(*args, **options)

    fake_redis.execute_command = recording  # type: ignore[method-assign]
    for _ in range(2):
        result = ECHO.call(fake_redis, keys={"second_key": "b", "first_key": "a"}, args={"greeting": "hi"}, rest=[1, 2])
        assert result == [b"a", b"b", b"hi", 2]
    assert commands == ["EVALSHA", "EVAL", "EVALSHA"]


@pytest.mark.parametrize(
    ("keys", "args"),
    [({"first_key": "a"}, {"greeting": "hi"}), ({"first_key": "a", "second_key": "b"}, {"greeting": "hi", "x": 1})],
)
def test_a_call_missing_or_adding_a_name_is_refused(
    fake_redis: fakeredis.FakeRedis, keys: dict[str, str], args: dict[str, object]
) -> None:
    with pytest.raises(TypeError):
        ECHO.call(fake_redis, keys=keys, args=args)


def test_a_script_without_a_tail_takes_none(fake_redis: fakeredis.FakeRedis) -> None:
    with pytest.raises(TypeError):
        lua.LEAD_SWEEP.call(fake_redis, keys={"sweeper": "s"}, args={"token": "t", "hold_ms": 10}, rest=["x"])


def test_names_must_be_distinct_identifiers() -> None:
    with pytest.raises(ValueError):
        lua.Script("bad", keys=("key",), args=("key",), body="return 1")
    with pytest.raises(ValueError):
        lua.Script("bad", keys=("a-key",), args=(), body="return 1")


@pytest.mark.parametrize("script", lua.ALL, ids=lambda script: script.name)
def test_every_script_compiles_and_reads_by_name(fake_redis: fakeredis.FakeRedis, script: lua.Script) -> None:
    assert fake_redis.script_load(script.source) == script.sha
    body = script.source.split("\n", len(script.keys) + len(script.args) + (1 if script.rest else 0))[-1]
    assert "KEYS[" not in body
    assert "ARGV[" not in body or (script.rest is not None and "ARGV[i]" in body)
