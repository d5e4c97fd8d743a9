"""The embedded shard's index build, off-process: copy the shard, index the copy in a child, swap it in.

`EdgeShard.optimize()` holds the GIL for its whole run (measured: a 16 s build froze every Python thread of the
process), so a thread would stall the event loop and all searches. Instead the live shard is flushed and copied
(`snapshot`), a child process optimizes the copy (`build`), and the indexed copy replaces the live shard with the
writes made meanwhile replayed on it (`swap`). The store decides when, holds writes back around `snapshot` and
`swap`, and runs every step but `build` on its write thread.

    <data dir>/retrieval          live shard
    <data dir>/retrieval.building copy being indexed by the child (removed if a build fails)
    <data dir>/retrieval.old      previous shard during a swap: the only copy holding every acknowledged write until
                                  the swap commits, so start-up restores it over the live path whenever it exists
    <data dir>/retrieval.replaced previous shard after the swap committed (being deleted; removed at start-up)
    <data dir>/retrieval.lock     held while the store is open: start-up recovery never touches a running store's data
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import sys
from dataclasses import dataclass
from typing import Sequence

import qdrant_edge as qe

from services.retrieval.store.base import StoreError

log = logging.getLogger("ragfleet.retrieval.edge")

# Runs in the child process: load the copy, build HNSW (and quantized codes), persist, release.
_OPTIMIZE_CHILD = ("import sys, qdrant_edge as qe\n"
                   "shard = qe.EdgeShard.load(sys.argv[1])\n"
                   "shard.optimize()\n"
                   "shard.flush()\n"
                   "shard.close()\n")


class SwapFailed(StoreError):
    """The swap was rolled back: `shard` is the previous shard, open again, to keep serving."""

    def __init__(self, cause: Exception, shard: qe.EdgeShard) -> None:
        super().__init__(str(cause))
        self.shard = shard


@dataclass(frozen=True)
class ShardFiles:
    """The live shard directory and its siblings (table above). Blocking methods; the caller holds the lock."""

    live: str

    @property
    def building(self) -> str:
        return self.live.rstrip("/") + ".building"

    @property
    def old(self) -> str:
        return self.live.rstrip("/") + ".old"

    @property
    def replaced(self) -> str:
        return self.live.rstrip("/") + ".replaced"

    @property
    def lock(self) -> str:
        return self.live.rstrip("/") + ".lock"

    def recover(self) -> None:
        """Finish whatever a crash interrupted, before the live shard is opened, never losing a write."""
        if os.path.isdir(self.old):
            # A swap was interrupted before it committed. Writes are held back for the whole swap, so the previous
            # shard has every acknowledged write; the live path is missing or an indexed copy without the journal.
            log.warning("restoring %s: an index swap was interrupted", self.old)
            if os.path.lexists(self.live):
                shutil.rmtree(self.live)
            os.rename(self.old, self.live)
        for leftover in (self.building, self.replaced):
            if os.path.isdir(leftover):
                shutil.rmtree(leftover)  # an unfinished build, or a shard a committed swap replaced

    def snapshot(self, shard: qe.EdgeShard) -> None:
        """Flush the live shard and copy it for the build; no write may fall between the two."""
        shard.flush()
        if os.path.isdir(self.building):
            shutil.rmtree(self.building)
        shutil.copytree(self.live, self.building)

    async def build(self) -> None:
        """Index the copy in a child process; raises StoreError if the child fails."""
        child = await asyncio.create_subprocess_exec(sys.executable, "-c", _OPTIMIZE_CHILD, self.building,
                                                     stderr=asyncio.subprocess.PIPE)
        try:
            _, stderr = await child.communicate()
        except asyncio.CancelledError:  # shutting down: do not leave an orphan writing the copy
            child.kill()
            await child.wait()
            raise
        if child.returncode != 0:
            raise StoreError(f"index build exited with {child.returncode}: {stderr.decode()[-500:]}")

    def discard_build(self) -> None:
        shutil.rmtree(self.building, ignore_errors=True)

    def discard_replaced(self) -> None:
        """Delete the shard a committed swap replaced; call once the new shard is in use (a crash here loses
        nothing: start-up removes the rest)."""
        shutil.rmtree(self.replaced, ignore_errors=True)

    def swap(self, live: qe.EdgeShard, journal: Sequence[qe.UpdateOperation]) -> qe.EdgeShard:
        """Close live, move the indexed copy in, replay the writes made during the build; returns the new shard
        (then `discard_replaced`).

        On failure the previous shard is put back and raised with SwapFailed. Until the commit (moving .old aside) a
        crash leaves .old, which start-up restores: it has every write."""
        closed = False
        shard: qe.EdgeShard | None = None
        try:
            for stale in (self.old, self.replaced):
                if os.path.lexists(stale):  # not authoritative while we run: start-up already restored any .old
                    log.warning("removing stale %s before swapping", stale)
                    shutil.rmtree(stale)
            live.close()
            closed = True
            os.rename(self.live, self.old)
            os.rename(self.building, self.live)
            shard = qe.EdgeShard.load(self.live)
            for operation in journal:
                shard.update(operation)
            shard.flush()  # the replayed writes must be on disk before the only other copy of them goes
            os.rename(self.old, self.replaced)  # the commit: from here on the new shard is authoritative
        except Exception as exc:
            log.exception("swapping in the indexed shard failed; restoring the previous one")
            if shard is not None:
                with contextlib.suppress(Exception):
                    shard.close()
            raise SwapFailed(exc, self._restore_previous() if closed else live) from exc
        return shard

    def _restore_previous(self) -> qe.EdgeShard:
        """Put the pre-swap shard back at the live path (wherever the swap stopped) and open it."""
        if os.path.isdir(self.old):
            if os.path.lexists(self.live):
                shutil.rmtree(self.live)
            os.rename(self.old, self.live)
        return qe.EdgeShard.load(self.live)
