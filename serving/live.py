"""Live user histories: the clicks POST /events brought in since the served run's data.

The next /recommend of a user reads their stored history (the run's data) followed by their live
clicks, so the user tower and the ranker's history inputs see an event as soon as it is accepted.
Items are kept by item id, not by index row: a reload to another run maps them through its own
index, and items it does not know are skipped.

Memory is bounded twice: per user, the model's history length (older live clicks leave the
history; every event stays in ``RUN/events``); overall, ``serve.live_users`` users, the least
recently active evicted (their events stay in the log, which the next update trains on).
"""

from __future__ import annotations

import bisect
import threading
from collections import OrderedDict
from typing import Any, Sequence


class LiveHistories:
    """user id -> the last ``history_len`` clicked (timestamp, arrival, item id), oldest first; thread-safe."""

    def __init__(self, history_len: int, max_users: int):
        self.history_len = history_len
        self.max_users = max_users
        self.evicted = 0  # users dropped to make room, since start
        self._users: OrderedDict[Any, list[tuple[int, int, Any]]] = OrderedDict()
        self._arrivals = 0
        self._lock = threading.Lock()

    def add(self, users: Sequence[Any], items: Sequence[Any], timestamps: Sequence[int]) -> None:
        """Clicks, in arrival order; a user's clicks are kept in timestamp order (late events slot in)."""
        with self._lock:
            for user, item, timestamp in zip(users, items, timestamps):
                self._arrivals += 1
                events = self._users.pop(user, None) or []
                bisect.insort(events, (timestamp, self._arrivals, item), key=lambda event: event[:2])
                del events[: -self.history_len]
                self._users[user] = events  # most recently active last
            while len(self._users) > self.max_users:
                self._users.popitem(last=False)
                self.evicted += 1

    def items(self, user: Any) -> list[Any]:
        """The user's live clicked item ids, oldest first ([] for a user without live events)."""
        with self._lock:
            return [item for _, _, item in self._users.get(user, ())]

    def keep_after(self, cut: int, history_len: int | None = None) -> int:
        """Drop events at or before ``cut`` (a newly loaded run's data holds them); returns how many went."""
        dropped = 0
        with self._lock:
            if history_len is not None:
                self.history_len = history_len
            for user in list(self._users):
                events = self._users[user]
                kept = [event for event in events if event[0] > cut][-self.history_len :]
                dropped += len(events) - len(kept)
                if kept:
                    self._users[user] = kept
                else:
                    del self._users[user]
        return dropped

    def __len__(self) -> int:
        return len(self._users)
