"""The latest few browser (or API) sessions' state, by session key: the conversations' KV-cache rows,
the Inside view's walks. Past `keep`, the least recently used idle ones are closed; one in use stays."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class SessionLRU(Generic[T]):
    def __init__(self, keep: int, is_idle: Callable[[T], bool] = lambda value: True,
                 on_evict: Callable[[str, T], None] = lambda key, value: value.close()):
        self.keep, self.is_idle, self.on_evict = int(keep), is_idle, on_evict
        self._items: OrderedDict[str, T] = OrderedDict()
        self.lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: str) -> bool:
        return key in self._items

    def get(self, key: str) -> T | None:
        with self.lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def get_or_create(self, key: str, make: Callable[[], T]) -> T:
        with self.lock:
            if key not in self._items:
                self._items[key] = make()
                self._evict(but=key)
            self._items.move_to_end(key)
            return self._items[key]

    def put(self, key: str, value: T) -> None:
        """Keep `value` for `key`; the value it replaces is closed."""
        with self.lock:
            old = self._items.pop(key, None)
            self._items[key] = value
            self._evict(but=key)
        if old is not None and old is not value:
            self.on_evict(key, old)

    def pop(self, key: str) -> T | None:
        """Forget `key`, returning its value unclosed (the caller closes it)."""
        with self.lock:
            return self._items.pop(key, None)

    def _evict(self, but: str) -> None:
        idle = [k for k, v in self._items.items() if k != but and self.is_idle(v)]
        for key in idle[:max(0, len(self._items) - self.keep)]:
            self.on_evict(key, self._items.pop(key))
