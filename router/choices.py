"""`n` > 1: one decoder sequence per choice, merged into one stream of (index, chunk).

Choice 0 runs alone until its first chunk: by then its prompt's full blocks are in the
decoder's prefix cache, so the other choices, admitted after it, reuse them and compute
only the prompt's last, partial block (the prefill is shared through the cache, not by
forking a sequence). Seeds: choice 0 keeps the request's, choice i gets a hash of
(seed, i), so every choice is reproducible and n=1 equals choice 0 of n>1.

Runs on the caller's event loop; each choice is a task. Leaving the merged stream
early, or one choice failing, cancels the others (each then aborts its sequence).
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from typing import TypeVar

T = TypeVar("T")


def choice_seed(seed: int | None, index: int) -> int | None:
    """Choice 0 keeps `seed`; choice i a 63-bit hash of (seed, i). None stays None (the
    decoder draws a fresh seed per sequence)."""
    if seed is None or index == 0:
        return seed
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


async def merge_choices(n: int, generate: Callable[[int], AsyncIterator[T]]
                        ) -> AsyncIterator[tuple[int, T]]:
    """(choice index, item) as they arrive from `generate(0)`, ..., `generate(n - 1)`."""
    if n == 1:
        async with aclosing(generate(0)) as items:
            async for item in items:
                yield 0, item
        return
    out: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(index: int) -> None:
        try:
            async for item in generate(index):
                out.put_nowait((index, item))
            out.put_nowait((index, done))
        except Exception as error:  # noqa: BLE001: raised again by the consumer below
            out.put_nowait((index, error))

    tasks = [asyncio.create_task(pump(0))]
    running = 1
    try:
        while running:
            index, item = await out.get()
            if len(tasks) == 1:  # choice 0's first item (or its end): start the others
                tasks += [asyncio.create_task(pump(i)) for i in range(1, n)]
                running += n - 1
            if item is done:
                running -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
