"""Several engine streams as one: a /v1/completions request with a list of prompts.

Each prompt is its own engine request; their Deltas interleave as the engine produces them, and the
choice index becomes ``prompt * n + sample``, OpenAI's numbering.
"""
from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator

from runtime.serve.contract import Delta

_END = object()


def merge(streams: list[AsyncIterator[Delta]], n: int) -> AsyncIterator[Delta]:
    """Deltas of every stream as they come; the first error of any stream is raised (the others are
    then aborted, as is every stream when the consumer closes this one early)."""
    return streams[0] if len(streams) == 1 else _merged(streams, n)


async def _merged(streams: list[AsyncIterator[Delta]], n: int) -> AsyncIterator[Delta]:
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(k: int, stream: AsyncIterator[Delta]) -> None:
        try:
            async for delta in stream:
                await queue.put(dataclasses.replace(delta, index=k * n + delta.index))
        except Exception as e:  # raised to the consumer below, in arrival order
            await queue.put(e)
        finally:
            await queue.put(_END)

    tasks = [asyncio.ensure_future(pump(k, s)) for k, s in enumerate(streams)]
    try:
        live = len(tasks)
        while live:
            item = await queue.get()
            if item is _END:
                live -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield item
    finally:
        # Cancelling a pump closes its stream at the await it is parked on, which aborts the request.
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for s in streams:  # one whose pump never started still has to say it was aborted
            await s.aclose()
