"""Micro-batching of concurrent /recommend requests: one user-tower pass, one FAISS search and one
ranker pass for every request that is waiting, instead of one of each per request.

Request threads check and resolve their own request (``Recommender.prepare``: a bad one fails
alone) and hand it to one worker thread, which takes the first waiting request, then every other
already waiting (up to ``serve.batch_max``; ``serve.batch_wait_ms`` > 0 also waits that long for
more), runs ``Recommender.recommend_many`` and hands each thread its result. At low load a batch
is one request and nothing waits; under load the per-call overheads (Python, torch dispatch, FAISS
setup) are paid once per batch. Requests of a batch share one recommender: after a reload, the
requests prepared on the old one finish on it.

``serve.batch_workers`` workers take batches from the one queue: while one is inside a torch or
FAISS call (which let go of the GIL), another assembles or finishes its batch, so a second core
does model work. Each worker runs its own batch on one intra-op thread (``serve.threads``).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future
from typing import Any

from serving.recommender import Prepared, Recommender, Result

log = logging.getLogger("recsys.serving")


class MicroBatcher:
    """Worker threads that run waiting requests together (``submit`` blocks until its result is ready)."""

    def __init__(self, max_batch: int, wait_ms: float = 0.0, workers: int = 1):
        if workers < 1:
            raise ValueError(f"MicroBatcher needs at least one worker, got {workers}")
        self.max_batch = max_batch
        self.wait_s = wait_ms / 1000
        self.batches = 0
        self.requests = 0
        self._counts = threading.Lock()
        self._queue: queue.SimpleQueue[tuple[Recommender, Prepared, Future] | None] = queue.SimpleQueue()
        self._workers = [threading.Thread(target=self._run, name=f"recommend-batcher-{i}", daemon=True) for i in range(workers)]
        for worker in self._workers:
            worker.start()

    def enqueue(self, recommender: Recommender, request: Prepared) -> Future:
        """Queue ``request``; its result (or error) arrives in the returned future (``asyncio.wrap_future`` awaits it)."""
        future: Future[Result] = Future()
        self._queue.put((recommender, request, future))
        return future

    def submit(self, recommender: Recommender, request: Prepared) -> Result:
        return self.enqueue(recommender, request).result()

    def close(self) -> None:
        self._queue.put(None)  # each worker that meets it puts it back for the next
        for worker in self._workers:
            worker.join(timeout=10)

    def _take(self) -> list[tuple[Recommender, Prepared, Future]] | None:
        first = self._queue.get()
        if first is None:
            self._queue.put(None)
            return None
        batch = [first]
        deadline = time.perf_counter() + self.wait_s
        while len(batch) < self.max_batch:
            try:
                remaining = deadline - time.perf_counter()
                item = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if item is None:
                self._queue.put(None)  # close after this batch
                break
            batch.append(item)
        return batch

    def _run(self) -> None:
        while (batch := self._take()) is not None:
            groups: dict[int, list[tuple[Recommender, Prepared, Future]]] = {}
            for entry in batch:
                if entry[2].set_running_or_notify_cancel():  # False: its waiter gave up (a cancelled await) before the batch ran
                    groups.setdefault(id(entry[0]), []).append(entry)  # one recommender per pass (a reload may have swapped it)
            for entries in groups.values():  # running futures cannot be cancelled: every result below lands
                self._serve(entries)

    def _serve(self, entries: list[tuple[Recommender, Prepared, Future]]) -> None:
        recommender = entries[0][0]
        try:
            results: list[Any] = recommender.recommend_many([request for _, request, _ in entries])
        except BaseException as exc:  # noqa: BLE001 (each waiting request gets the error: the service answers it like an unbatched one)
            for _, _, future in entries:
                future.set_exception(exc)
            return
        with self._counts:
            self.batches += 1
            self.requests += len(entries)
        for (_, _, future), result in zip(entries, results):
            future.set_result(result)
