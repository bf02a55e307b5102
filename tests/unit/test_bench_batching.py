"""The batching benchmark's arithmetic and report, on made-up measurements."""

from __future__ import annotations

from pathlib import Path

from bench.batching import Level, cascade_toml, checks, report, summarise
from settings import load_settings


def level(wall_s: float, tokens: list[int], texts: list[str]) -> Level:
    return Level(wall_s=wall_s, tokens=tokens, ttft_s=[0.1 * (i + 1) for i in range(len(tokens))], texts=texts)


def test_ratios_at_eight_and_greedy_differences_are_counted() -> None:
    texts = [f"answer {i}" for i in range(8)]
    results: dict[int, dict[str, Level | None]] = {
        8: {
            "cascade_sequential": level(8.0, [32] * 8, texts),
            "cascade_batched": level(4.0, [32] * 8, [*texts[:7], "different"]),
            "raw_generate_batch": level(3.2, [32] * 8, texts),
            "transformers_serve": None,
        }
    }
    figures = summarise(results, 32, "fastapi missing")
    assert figures["at8_vs_sequential"] == 2.0
    assert round(figures["at8_vs_raw"], 3) == 0.8
    assert figures["differ"]["cascade_batched"] == [1, 8]
    assert figures["differ"]["raw_generate_batch"] == [0, 8]
    assert figures["differ"]["transformers_serve"] == [0, 0]
    assert [check["ok"] for check in checks(figures)] == [True, False]  # 2x sequential, 0.8x raw
    text = report(figures, "python -m bench.batching", (1.0, 2.0))
    assert "| 8 | cascade batched | 64.0 | 450 | 793 |" in text
    assert "did not run: fastapi missing" in text
    assert "cascade batched 1/8" in text


def test_targets_not_run_are_missed() -> None:
    figures = summarise({1: {"cascade_sequential": level(1.0, [4], ["a"])}}, 4, None)
    assert [check["measured"] for check in checks(figures)] == ["not run", "not run"]
    assert not any(check["ok"] for check in checks(figures))


def test_the_workers_config_is_valid(tmp_path: Path) -> None:
    config = tmp_path / "bench.toml"
    config.write_text(cascade_toml(32))
    settings = load_settings(config)
    widths = {pid: getattr(p, "max_batch_size", None) for pid, p in settings.providers.items()}
    assert widths == {"seq": 1, "b4": 4, "b8": 8, "b16": 16}
    assert {settings.queue_of(pid) for pid in widths} == {"chat.gpu.seq", "chat.gpu.b4", "chat.gpu.b8", "chat.gpu.b16"}
