"""Rank 0's bookkeeping of cache blocks: a free list and one block table per sequence.

Every rank holds the same number of blocks, so one manager on rank 0 decides for all of them;
the tables travel to the other ranks inside each step's ``SeqSlice.blocks``.
"""
from __future__ import annotations

from formats.errors import TpDeployError


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1:
            raise TpDeployError("the KV cache has no room for even one block; give it more memory "
                                "(--cache-max-entry-count, --kv-cache-tokens) or pick a smaller --kv-dtype")
        self.num_blocks, self.block_size = num_blocks, block_size
        # LIFO: a block freed just now is reused first (its pages are warm and already committed).
        self._free = list(range(num_blocks - 1, -1, -1))
        self.tables: dict[int, list[int]] = {}

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def can_grow(self, seq_id: int, tokens: int) -> bool:
        return self._missing(seq_id, tokens) <= len(self._free)

    def grow(self, seq_id: int, tokens: int) -> tuple[int, ...]:
        """Make ``seq_id``'s table hold ``tokens`` tokens; returns the whole table."""
        missing = self._missing(seq_id, tokens)
        if missing > len(self._free):
            raise TpDeployError(f"the KV cache is out of blocks: sequence {seq_id} needs {missing} more, "
                                f"{len(self._free)} of {self.num_blocks} are free")
        table = self.tables.setdefault(seq_id, [])
        table.extend(self._free.pop() for _ in range(missing))
        return tuple(table)

    def free(self, seq_id: int) -> None:
        self._free.extend(reversed(self.tables.pop(seq_id, [])))

    def _missing(self, seq_id: int, tokens: int) -> int:
        return max(0, self.blocks_for(tokens) - len(self.tables.get(seq_id, ())))
