"""Generate a multi-turn chat trace in Mooncake's format, to check policies off the one public
trace.

The public synthetic trace repeats fixed documents and has no growing conversations and no
shared heads (docs/policies.md). Chat serving looks different, and a default policy must not
depend on the one structure it was tuned on. This generator makes the other common shape:

* a few system prompts, chosen by Zipf popularity, are the shared heads of many chains;
* sessions arrive as a Poisson process; each runs a geometric number of turns;
* turn k's prompt is turn k-1's prompt, plus its answer, plus the new user message, so a
  session's chain grows and every turn's prefix is the previous turn's whole prompt;
* think time between turns is log-normal (a few seconds to minutes), and some sessions are
  abandoned: the cache cannot know which.

Every block is one 512-token block; ids are unique except for the shared system prompts.

    python -m loadtest.gentrace --out chat.jsonl --sessions 3000 --seed 1
    kvgate replay --trace chat.jsonl --simulate --capacity-fraction 0.02 --policy lru
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import random
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypedDict

BLOCK_TOKENS = 512


class TraceRecord(TypedDict):
    """One request, as the Mooncake trace files write it."""

    timestamp: int
    input_length: int
    output_length: int
    hash_ids: list[int]


@dataclass(frozen=True, slots=True)
class ChatTraceConfig:
    sessions: int = 3000
    session_rate_per_s: float = 2.0
    system_prompts: int = 16
    system_blocks: tuple[int, int] = (2, 12)
    zipf_s: float = 1.1
    mean_turns: float = 5.0
    user_blocks: tuple[int, int] = (1, 4)
    answer_blocks: tuple[int, int] = (1, 3)
    think_median_s: float = 30.0
    think_sigma: float = 1.0
    max_blocks: int = 256
    seed: int = 0


@dataclass(order=True, slots=True)
class _Turn:
    at_s: float
    session: int = field(compare=False)
    prompt: list[int] = field(compare=False)
    turns_left: int = field(compare=False)


def generate(config: ChatTraceConfig) -> Iterator[TraceRecord]:
    """The trace's requests in time order, as Mooncake-format records."""
    rng = random.Random(config.seed)
    next_id = 0

    def fresh(n: int) -> list[int]:
        nonlocal next_id
        ids = list(range(next_id, next_id + n))
        next_id += n
        return ids

    heads = [fresh(rng.randint(*config.system_blocks)) for _ in range(config.system_prompts)]
    weights = [1.0 / (rank + 1) ** config.zipf_s for rank in range(len(heads))]
    pending: list[_Turn] = []
    start = 0.0
    for session in range(config.sessions):
        start += rng.expovariate(config.session_rate_per_s)
        head = rng.choices(heads, weights)[0]
        turns = 1 + _geometric(rng, config.mean_turns - 1.0)
        prompt = [*head, *fresh(rng.randint(*config.user_blocks))]
        heapq.heappush(pending, _Turn(start, session, prompt, turns - 1))
    while pending:
        turn = heapq.heappop(pending)
        prompt = turn.prompt[: config.max_blocks]
        answer = rng.randint(*config.answer_blocks)
        yield {
            "timestamp": int(turn.at_s * 1000),
            "input_length": len(prompt) * BLOCK_TOKENS,
            "output_length": answer * BLOCK_TOKENS,
            "hash_ids": prompt,
        }
        if turn.turns_left > 0 and len(prompt) < config.max_blocks:
            think = rng.lognormvariate(math.log(config.think_median_s), config.think_sigma)
            grown = [*prompt, *fresh(answer), *fresh(rng.randint(*config.user_blocks))]
            heapq.heappush(
                pending, _Turn(turn.at_s + think, turn.session, grown, turn.turns_left - 1)
            )


def _geometric(rng: random.Random, mean: float) -> int:
    """Failures before the first success, with the given mean (0 when mean <= 0)."""
    if mean <= 0:
        return 0
    p = 1.0 / (1.0 + mean)
    return int(math.log(1.0 - rng.random()) / math.log(1.0 - p))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.gentrace",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    defaults = ChatTraceConfig()
    parser.add_argument("--out", type=Path, required=True, help="JSONL file to write")
    parser.add_argument("--sessions", type=int, default=defaults.sessions)
    parser.add_argument(
        "--session-rate", type=float, default=defaults.session_rate_per_s, help="new sessions/s"
    )
    parser.add_argument("--system-prompts", type=int, default=defaults.system_prompts)
    parser.add_argument("--mean-turns", type=float, default=defaults.mean_turns)
    parser.add_argument(
        "--think-median", type=float, default=defaults.think_median_s, help="seconds"
    )
    parser.add_argument("--seed", type=int, default=defaults.seed)
    args = parser.parse_args(argv)
    config = ChatTraceConfig(
        sessions=args.sessions,
        session_rate_per_s=args.session_rate,
        system_prompts=args.system_prompts,
        mean_turns=args.mean_turns,
        think_median_s=args.think_median,
        seed=args.seed,
    )
    requests = blocks = 0
    with args.out.open("w") as out:
        for record in generate(config):
            out.write(json.dumps(record) + "\n")
            requests += 1
            blocks += len(record["hash_ids"])
    print(f"{requests} requests, {blocks} block accesses -> {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
