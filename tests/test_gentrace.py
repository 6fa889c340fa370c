"""The multi-turn chat trace generator (loadtest/gentrace.py): the structure it promises."""

from __future__ import annotations

import json
from pathlib import Path

from loadtest.gentrace import BLOCK_TOKENS, ChatTraceConfig, generate, main


def test_turns_extend_their_previous_prompt_and_heads_are_shared() -> None:
    config = ChatTraceConfig(sessions=200, system_prompts=4, seed=3)
    records = list(generate(config))
    times = [r["timestamp"] for r in records]
    assert times == sorted(times)
    prompts = [r["hash_ids"] for r in records]
    assert all(r["input_length"] == len(r["hash_ids"]) * BLOCK_TOKENS for r in records)
    # Every prompt after a session's first is a strict extension of an earlier prompt.
    seen: set[tuple[int, ...]] = set()
    extensions = 0
    for prompt in prompts:
        if any(tuple(prompt[:n]) in seen for n in range(len(prompt) - 1, 0, -1)):
            extensions += 1
        seen.add(tuple(prompt))
    assert extensions == len(prompts) - config.sessions
    # At most system_prompts distinct first blocks, and the popular heads serve many sessions.
    firsts = [p[0] for p in prompts]
    assert len(set(firsts)) <= config.system_prompts
    assert max(firsts.count(f) for f in set(firsts)) > len(prompts) // 4


def test_same_seed_same_trace_and_the_cli_writes_it(tmp_path: Path) -> None:
    config = ChatTraceConfig(sessions=50, seed=7)
    assert list(generate(config)) == list(generate(config))
    assert list(generate(config)) != list(generate(ChatTraceConfig(sessions=50, seed=8)))
    out = tmp_path / "chat.jsonl"
    assert main(["--out", str(out), "--sessions", "50", "--seed", "7"]) == 0
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert written == list(generate(config))
