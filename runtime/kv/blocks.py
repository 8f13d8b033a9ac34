"""Rank 0's bookkeeping of cache blocks: a free list, one block table per sequence, and (optionally)
a prefix cache of full blocks shared between sequences.

Every rank holds the same number of blocks, so one manager on rank 0 decides for all of them;
the tables travel to the other ranks inside each step's ``SeqSlice.blocks``.

Prefix caching: a block that is full is known by the hash of its tokens and of every token before
it (``hash(parent_hash, block_tokens)``), so two prompts that share their first N blocks share the
blocks themselves. Shared blocks are reference-counted; a block nobody holds keeps its contents and
its hash, and is reused for new data only when no never-cached block is left (least recently
released first), so a repeated system prompt stays cached as long as memory allows.
"""
from __future__ import annotations

from collections import OrderedDict

from formats.errors import TpDeployError


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = False, tail_slots: int = 0):
        """``tail_slots``: with int4 keys, each sequence holding blocks also holds one of these slots for its
        partial last block (``PagedKVCache.k_tail``); 0: the format needs none."""
        if num_blocks < 1:
            raise TpDeployError("the KV cache has no room for even one block; give it more memory "
                                "(--cache-max-entry-count, --kv-cache-tokens) or pick a smaller --kv-dtype")
        self.num_blocks, self.block_size, self.prefix_caching = num_blocks, block_size, prefix_caching
        # LIFO: a block freed just now is reused first (its pages are warm and already committed).
        self._free = list(range(num_blocks - 1, -1, -1))
        self._cached: OrderedDict[int, int] = OrderedDict()  # block -> hash, unreferenced, oldest first
        self._by_hash: dict[int, int] = {}  # hash -> block
        self._hash_of: dict[int, int] = {}  # block -> hash
        self._refs = [0] * num_blocks
        self._hashed: dict[int, tuple[int, int]] = {}  # seq -> (blocks hashed so far, last hash)
        self.tables: dict[int, list[int]] = {}
        self._tuples: dict[int, tuple[int, ...]] = {}  # seq -> its table as last handed out by table()
        self.uses_tails = tail_slots > 0
        self._free_tails = list(range(tail_slots - 1, -1, -1))
        self._tails: dict[int, int] = {}  # seq -> its tail slot

    @property
    def num_free(self) -> int:
        """Blocks available for new data (cached but unreferenced blocks count: they can be reused)."""
        return len(self._free) + len(self._cached)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def can_grow(self, seq_id: int, tokens: int) -> bool:
        return self._missing(seq_id, tokens) <= self.num_free and self._has_tail(seq_id)

    def grow(self, seq_id: int, tokens: int) -> tuple[int, ...]:
        """Make ``seq_id``'s table hold ``tokens`` tokens; returns the whole table."""
        missing = self._missing(seq_id, tokens)
        if missing > self.num_free:
            raise TpDeployError(f"the KV cache is out of blocks: sequence {seq_id} needs {missing} more, "
                                f"{self.num_free} of {self.num_blocks} are free")
        if not self._has_tail(seq_id):
            raise TpDeployError(f"the KV cache is out of tail slots: sequence {seq_id} needs one, all "
                                f"{len(self._tails)} are held (more sequences than --max-batch-size at once)")
        if self.uses_tails and seq_id not in self._tails:
            self._tails[seq_id] = self._free_tails.pop()
        table = self.tables.setdefault(seq_id, [])
        for _ in range(missing):
            block = self._take()
            self._refs[block] = 1
            table.append(block)
        return self.table(seq_id)

    def table(self, seq_id: int) -> tuple[int, ...]:
        """``seq_id``'s block table as a tuple: the same object for as long as the table is unchanged, so
        handing it to every step costs nothing (and the other ranks' copy can be checked by identity).
        Tables only grow by appending, or are dropped whole (``free``), so the length tells a change."""
        table = self.tables.get(seq_id)
        if table is None:
            return ()
        frozen = self._tuples.get(seq_id)
        if frozen is None or len(frozen) != len(table):
            frozen = self._tuples[seq_id] = tuple(table)
        return frozen

    def tail(self, seq_id: int) -> int:
        """``seq_id``'s tail slot, -1 when the format needs none (or it holds no blocks)."""
        return self._tails.get(seq_id, -1)

    def free(self, seq_id: int) -> None:
        if seq_id in self._tails:
            self._free_tails.append(self._tails.pop(seq_id))
        self._hashed.pop(seq_id, None)
        self._tuples.pop(seq_id, None)
        for block in reversed(self.tables.pop(seq_id, [])):
            self._refs[block] -= 1
            if self._refs[block] == 0:
                if block in self._hash_of:
                    self._cached[block] = self._hash_of[block]
                else:
                    self._free.append(block)

    # -- prefix caching -------------------------------------------------------------------------------

    def match_prefix(self, seq_id: int, tokens: list[int]) -> int:
        """Share the cached full blocks that start ``tokens`` with a new ``seq_id``; returns the number of
        tokens they cover. The last token is always left to compute (its logits are needed)."""
        if not self.prefix_caching or seq_id in self.tables:
            return 0
        table, parent = [], 0
        for start in range(0, len(tokens) - 1 - self.block_size + 1, self.block_size):
            parent = hash((parent, tuple(tokens[start:start + self.block_size])))
            block = self._by_hash.get(parent)
            if block is None:
                break
            if self._refs[block] == 0:
                del self._cached[block]
            self._refs[block] += 1
            table.append(block)
        if table:
            self.tables[seq_id] = table
            self._hashed[seq_id] = (len(table), parent)
        return len(table) * self.block_size

    def register_full_blocks(self, seq_id: int, tokens: list[int], computed: int) -> None:
        """Record the hashes of ``seq_id``'s blocks that are full of computed tokens (incrementally)."""
        if not self.prefix_caching:
            return
        table = self.tables.get(seq_id, [])
        done, parent = self._hashed.get(seq_id, (0, 0))
        for i in range(done, min(computed // self.block_size, len(table))):
            parent = hash((parent, tuple(tokens[i * self.block_size:(i + 1) * self.block_size])))
            block = table[i]
            if parent not in self._by_hash and block not in self._hash_of:
                self._by_hash[parent], self._hash_of[block] = block, parent
            done = i + 1
        self._hashed[seq_id] = (done, parent)

    def _take(self) -> int:
        if self._free:
            return self._free.pop()
        block, h = self._cached.popitem(last=False)  # least recently released cached block
        del self._by_hash[h], self._hash_of[block]
        return block

    def _has_tail(self, seq_id: int) -> bool:
        return not self.uses_tails or seq_id in self._tails or bool(self._free_tails)

    def _missing(self, seq_id: int, tokens: int) -> int:
        return max(0, self.blocks_for(tokens) - len(self.tables.get(seq_id, ())))
