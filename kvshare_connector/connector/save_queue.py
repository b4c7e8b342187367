"""Write-behind for prompt KV: chunk, store and confirm off the request's critical path.

The worker copies a finished prompt's K/V out of vLLM's blocks synchronously (the
blocks may be reused as soon as the step ends) and hands the copy to a :class:`SaveQueue`,
whose thread cuts it into chunks, writes them to the tiers and checks that every chunk is
held. Results are collected by the worker each step and reported to the scheduler, which
indexes an entry only once all its chunks are stored.

Loads read through the queue (:meth:`SaveQueue.get`): until a job is written its chunks
are served from it, so a similar prompt arriving right after this one loads them without
waiting for the tiers.

Memory is bounded: ``capacity_bytes`` of KV may wait in the queue; a submit beyond that
blocks until the writer has caught up (back-pressure), so a slow tier slows serving
instead of growing memory without bound. One job larger than the bound still goes
through when the queue is empty.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from dataclasses import dataclass

import torch

from kvshare.heap import HeapTrimmer
from kvshare.storage.chunk import KVChunk, split_prompt_kv
from kvshare.storage.keys import ChunkKey
from kvshare.storage.tiered_store import ChunkStore

logger = logging.getLogger(__name__)


@dataclass
class SaveJob:
    """One prompt's KV to store; chunk keys as in ``kvshare.storage.keys.chunk_keys``."""

    req_id: str
    kv: torch.Tensor
    """``[num_layers, 2, num_tokens, num_kv_heads, head_dim]``, a private copy."""
    token_ids: list[int]
    scope: str
    entry_id: str
    exact_tokens: int

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()


@dataclass
class SaveResult:
    req_id: str
    chunk_keys: list[str] | None
    """Hex keys of all the prompt's chunks, all held by the tiers; None if any is not."""


class SaveQueue:
    """A writer thread over ``store``; see the module docstring.

    Invariant: every submitted job yields exactly one :class:`SaveResult`, also when
    storing raises, so the scheduler never waits for an answer that cannot come.
    """

    def __init__(self, store: ChunkStore, model_id: str, chunk_tokens: int,
                 capacity_bytes: int) -> None:
        self.store = store
        self.model_id = model_id
        self.chunk_tokens = chunk_tokens
        self.capacity_bytes = capacity_bytes
        self._jobs: deque[tuple[SaveJob, list[KVChunk]]] = deque()
        self._results: list[SaveResult] = []
        self._queued_bytes = 0
        self._closed = False
        self._cond = threading.Condition()
        self._heap = HeapTrimmer()
        """The copies this thread frees are the worker's largest buffers: it trims."""
        self._thread = threading.Thread(target=self._run, name="kvshare-save", daemon=True)
        self._thread.start()

    @property
    def queued_bytes(self) -> int:
        """KV bytes submitted and not yet written."""
        with self._cond:
            return self._queued_bytes

    def submit(self, job: SaveJob) -> None:
        """Queue ``job``; waits while the queue holds ``capacity_bytes`` already."""
        chunks = split_prompt_kv(self.model_id, job.kv, job.token_ids, self.chunk_tokens,
                                 scope=job.scope, exact_tokens=job.exact_tokens,
                                 variant=job.entry_id)
        with self._cond:
            if self._closed:
                raise RuntimeError("kvshare: the save queue is closed")
            while self._jobs and self._queued_bytes + job.nbytes > self.capacity_bytes:
                self._cond.wait()
            self._jobs.append((job, chunks))
            self._queued_bytes += job.nbytes
            self._cond.notify_all()

    def get(self, keys: list[ChunkKey]) -> list[KVChunk | None]:
        """Chunks by key: those of jobs not written yet (the one being written included: a
        job leaves the queue only once the tiers hold it), else from the tiers."""
        wanted = set(keys)
        with self._cond:
            queued = {chunk.key: chunk for _, chunks in self._jobs for chunk in chunks
                      if chunk.key in wanted}
        rest = [key for key in keys if key not in queued]
        stored = dict(zip(rest, self.store.get(rest))) if rest else {}
        return [queued.get(key) or stored.get(key) for key in keys]

    def take_results(self) -> list[SaveResult]:
        """Results of the jobs finished since the last call."""
        with self._cond:
            results, self._results = self._results, []
            return results

    def drain(self) -> None:
        """Wait until every submitted job has a result."""
        with self._cond:
            while self._jobs:
                self._cond.wait()

    def close(self) -> None:
        """Write what is queued, then stop the thread."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._jobs and not self._closed:
                    self._cond.wait()
                if not self._jobs:
                    return
                job, chunks = self._jobs[0]  # stays queued (and readable) until written
            result = SaveResult(job.req_id, self._store(job, chunks))
            with self._cond:
                self._jobs.popleft()
                self._queued_bytes -= job.nbytes
                self._results.append(result)
                self._cond.notify_all()
            del job, chunks  # the copies go now, before the trim
            self._heap.maybe_trim()

    def _store(self, job: SaveJob, chunks: list[KVChunk]) -> list[str] | None:
        try:
            keys = [chunk.key for chunk in chunks]
            # Chunks already held (a shared exact prefix) are not encoded and written again.
            missing = {key for key, held in zip(keys, self.store.contains(keys)) if not held}
            self.store.put([chunk for chunk in chunks if chunk.key in missing])
            if all(self.store.contains(keys)):
                return [key.hex() for key in keys]
        except Exception:
            logger.exception("kvshare: storing the prompt of %s failed", job.req_id)
        return None
