"""Where embeddings live between the encoder and the decoder.

`RayObjectStore` puts arrays in Ray's object store: the encoder replica that put
an array owns it, any node can read it, and it is freed when the last reference
goes. `LocalObjectStore` keeps arrays in this process; it serves tests of plain
service classes and the colocated layout, where encoder and decoder share a process.

Both raise `EmbeddingLostError` when an object can no longer be read (its owner
died, or a local entry was dropped), which callers treat as "encode again".
"""

from __future__ import annotations

import itertools
import threading
from typing import Any, Protocol

import numpy as np

from runtime.messages import EmbeddingLostError


class ObjectStore(Protocol):
    def put(self, array: np.ndarray) -> Any:
        """Stores `array`; returns a handle (an ObjectRef for Ray)."""

    def get(self, handles: list[Any], timeout_s: float | None = None) -> list[np.ndarray]:
        """Reads arrays back, in order. Raises EmbeddingLostError if one is gone."""


class RayObjectStore:
    def put(self, array: np.ndarray) -> Any:
        import ray

        return ray.put(array)

    def get(self, handles: list[Any], timeout_s: float | None = None) -> list[np.ndarray]:
        import ray
        from ray.exceptions import GetTimeoutError, ObjectLostError, OwnerDiedError

        try:
            return list(ray.get(list(handles), timeout=timeout_s))
        except (ObjectLostError, OwnerDiedError, GetTimeoutError) as error:
            raise EmbeddingLostError(f"an image embedding is no longer readable: {error}") from error


class LocalHandle(int):
    """Handle of a LocalObjectStore entry."""


class LocalObjectStore:
    def __init__(self) -> None:
        self._arrays: dict[int, np.ndarray] = {}
        self._ids = itertools.count()
        self._lock = threading.Lock()

    def put(self, array: np.ndarray) -> LocalHandle:
        with self._lock:
            handle = LocalHandle(next(self._ids))
            self._arrays[handle] = array
        return handle

    def get(self, handles: list[Any], timeout_s: float | None = None) -> list[np.ndarray]:
        with self._lock:
            missing = [h for h in handles if h not in self._arrays]
            if missing:
                raise EmbeddingLostError(f"local embeddings {missing} were dropped")
            return [self._arrays[h] for h in handles]

    def drop(self, handle: LocalHandle) -> None:
        """Frees an entry (what Ray does when the last reference goes)."""
        with self._lock:
            self._arrays.pop(handle, None)
