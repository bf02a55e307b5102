"""``python -m worker.demo`` (what ``cascade demo`` runs): an embedded Redis, a worker and one
streamed answer; see ``worker.demo.walkthrough``."""

from __future__ import annotations

import argparse

from worker.demo.walkthrough import run_demo


def main() -> int:
    """Parse the demo's options and run it."""
    parser = argparse.ArgumentParser(
        prog="cascade demo", description="start Redis and a worker locally and stream one answer"
    )
    parser.add_argument("--prompt", default="What is Natural Language Processing? Answer in two sentences.")
    parser.add_argument("--chain", default="default", help="default: SmolLM2 on the CPU; rehearsal: scripted")
    args = parser.parse_args()
    return run_demo(prompt=args.prompt, chain=args.chain)


if __name__ == "__main__":
    raise SystemExit(main())
