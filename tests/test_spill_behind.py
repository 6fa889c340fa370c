"""Write-behind demotion into the persistent tier (HierarchyConfig.spill_behind)."""

from __future__ import annotations

import asyncio
from typing import Any

from tiers.base import PutOutcome
from tiers.block import Block
from tiers.hierarchy import Hierarchy, HierarchyConfig, StoreOutcome
from tiers.memory import ArenaTier

PAGE = 4096


class GatedTier(ArenaTier):
    """A persistent tier whose stores wait until the test opens the gate."""

    volatile = False

    def __init__(self) -> None:
        super().__init__("slow", 64 * PAGE, page_bytes=PAGE)
        self.gate = asyncio.Event()
        self.waiting = 0

    async def put(self, key: str, block: Block) -> PutOutcome:
        self.waiting += 1
        await self.gate.wait()
        self.waiting -= 1
        return await super().put(key, block)


def gated(**config: Any) -> tuple[GatedTier, Hierarchy]:
    """A one-page hbm over a gated persistent tier, with write-behind ``config``."""
    slow = GatedTier()
    return slow, Hierarchy(
        [ArenaTier("hbm", PAGE, page_bytes=PAGE), slow], config=HierarchyConfig(**config)
    )


def block(tag: str) -> Block:
    return Block.of(tag.encode() * (PAGE // len(tag)))


async def test_a_put_does_not_wait_for_the_disk_and_the_victim_stays_readable() -> None:
    slow, h = gated(spill_behind=2)
    assert await h.put("a", block("a")) is StoreOutcome.STORED
    # "b" pushes "a" to the slow tier; the put returns while that write is still held.
    assert await asyncio.wait_for(h.put("b", block("b")), 1.0) is StoreOutcome.STORED
    await asyncio.sleep(0)
    assert slow.waiting == 1
    hit = await h.get("a")
    assert hit is not None and bytes(hit.block.data) == bytes(block("a").data)
    assert h.locate("a") == "hbm"  # still in flight from hbm
    slow.gate.set()
    await h.quiesce()
    assert h.locate("a") == "slow"
    assert slow.contains("a")


async def test_a_delete_during_the_background_move_wins() -> None:
    slow, h = gated(spill_behind=1)
    await h.put("a", block("a"))
    await h.put("b", block("b"))
    assert await h.delete("a")
    assert h.locate("a") is None
    slow.gate.set()
    await h.quiesce()
    assert not slow.contains("a")
    assert await h.get("a") is None


async def test_past_spill_behind_a_put_waits_for_a_slot() -> None:
    slow, h = gated(spill_behind=1)
    await h.put("a", block("a"))
    await h.put("b", block("b"))  # "a" in flight: the one slot is taken
    third = asyncio.ensure_future(h.put("c", block("c")))  # must move "b": waits for the slot
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert not third.done()
    slow.gate.set()
    assert await asyncio.wait_for(third, 1.0) is StoreOutcome.STORED
    await h.quiesce()
    assert {h.locate(k) for k in "abc"} == {"slow", "hbm"}
    assert h.locate("c") == "hbm"


async def test_with_shedding_a_busy_disk_drops_the_victim_instead_of_waiting() -> None:
    slow, h = gated(spill_behind=1, shed_when_disk_behind=True)
    await h.put("a", block("a"))
    await h.put("b", block("b"))  # "a" takes the one slot
    # "c" needs "b" out while the disk is busy: "b" is dropped and the put does not wait.
    assert await asyncio.wait_for(h.put("c", block("c")), 1.0) is StoreOutcome.STORED
    assert h.locate("b") is None
    assert h.shed_counts() == {"hbm": 1, "slow": 0}
    slow.gate.set()
    await h.quiesce()
    assert h.locate("a") == "slow" and h.locate("c") == "hbm"


async def test_a_writer_cancelled_while_waiting_for_a_slot_still_spills_its_victim() -> None:
    slow, h = gated(spill_behind=1)
    await h.put("a", block("a"))
    await h.put("b", block("b"))  # "a" in flight: the one slot is taken
    third = asyncio.ensure_future(h.put("c", block("c")))  # evicts "b", waits for the slot
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert not third.done()
    third.cancel()
    await asyncio.gather(third, return_exceptions=True)
    slow.gate.set()
    await h.quiesce()
    # "b" reached the slow tier instead of staying in flight forever.
    assert h.locate("a") == "slow" and h.locate("b") == "slow"
    hit = await h.get("b")
    assert hit is not None and hit.tier == "slow"
    assert bytes(hit.block.data) == bytes(block("b").data)
    assert await h.put("c", block("c")) is StoreOutcome.STORED


async def test_quiesce_returns_when_what_is_left_has_finished() -> None:
    """A finished task stays in the background set until its done callback runs. quiesce waits
    only for unfinished ones: gathering finished tasks completes without yielding on Python
    3.12+, so looping on the set itself spun forever there."""
    _, h = gated(spill_behind=1)
    finished = asyncio.get_running_loop().create_future()
    finished.set_result(None)
    h._background.add(finished)  # type: ignore[arg-type]  # its discard has not run yet
    await asyncio.wait_for(h.quiesce(), 5.0)
    assert finished in h._background
