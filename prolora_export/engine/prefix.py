"""A prefix cache keyed by (adapter, token prefix): a repeated system prompt or few-shot prefix for the
same adapter is not prefilled twice.

Prompts are cut into blocks of ``block`` tokens. After a prompt's prefill, the keys and values of each
of its full blocks are copied out of its :class:`~.pool.KVPool` row into a node of a trie: a node is
keyed by its owner (the adapter as loaded: a reloaded adapter is another owner), its parent node and its
tokens, so a node stands for the whole prefix up to its block. A new prompt walks the trie block by
block; the blocks found are copied into its row and only the rest of the prompt is prefilled (at least
its last token, whose logits pick the first token). A block's keys and values depend on the tokens
before it and on the adapter, both in its key, so a hit computes what a cold prefill computes.

It is never shared across adapters (llama.cpp's server shares its prompt cache across LoRA settings).
Bound: at most ``max_tokens`` cached positions; the least recently used leaf goes first (a node with
children is kept: its prefix is theirs). The leaves wait in a heap by last use, so an eviction costs a
heap operation, not a walk past every node with children (a long prompt filling a full cache cost the
square of its blocks).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np

from .pool import KVPool

#: tokens per cached block by default (vLLM's block size): small enough that a chat template's shared head
#: is reused (29 tokens of system prompt and instruction on the demo model: 16 reused, none at 32)
DEFAULT_BLOCK = 16

#: a node's key: (owner, parent node number, its block's tokens); parent 0 is the root
Key = tuple[int, int, tuple[int, ...]]


@dataclass(eq=False)
class Block:
    """One cached block: its keys and values, (KV heads, block, head size) per past input."""

    number: int
    key: Key
    arrays: dict[str, np.ndarray]
    parent: Block | None
    children: int = 0
    used: int = 0  # when it was last matched or inserted (the cache's clock)


class PrefixCache:
    """The trie of cached blocks, and its leaves by last use."""

    def __init__(self, block: int, max_tokens: int):
        if block < 1 or max_tokens < 0:
            raise ValueError("a prefix cache needs block ≥ 1 and max_tokens ≥ 0")
        self.block, self.max_tokens = block, max_tokens
        self.nodes: dict[Key, Block] = {}
        # (last use, number, key) of each leaf as it was when pushed; entries a later use, a child or an
        # eviction made stale are skipped when they come up
        self._leaves: list[tuple[int, int, Key]] = []
        self._clock = 0
        self._numbers = 0
        self.hits = 0  # prompts that reused a cached prefix
        self.tokens_reused = 0

    @property
    def tokens(self) -> int:
        """Positions cached."""
        return len(self.nodes) * self.block

    def match(self, owner: int, prompt: list[int]) -> list[Block]:
        """The cached blocks of ``prompt``'s longest cached prefix, leaving at least its last token to
        prefill (the blocks are held: eviction meanwhile does not change them)."""
        found: list[Block] = []
        parent = 0
        for start in range(0, len(prompt) - 1 - self.block + 1, self.block):
            key = (owner, parent, tuple(prompt[start:start + self.block]))
            node = self.nodes.get(key)
            if node is None:
                break
            self._use(node)
            found.append(node)
            parent = node.number
        return found

    def restore(self, blocks: list[Block], pool: KVPool, row: int) -> int:
        """Copy cached blocks into a pool row from its start; returns the positions restored."""
        for index, node in enumerate(blocks):
            columns = slice(index * self.block, (index + 1) * self.block)
            for name, array in node.arrays.items():
                pool.arrays[name][row, :, columns] = array
        if blocks:
            self.hits += 1
            self.tokens_reused += len(blocks) * self.block
        return len(blocks) * self.block

    def insert(self, owner: int, prompt: list[int], pool: KVPool, row: int) -> None:
        """Cache the full blocks of a prompt just prefilled into ``row`` (those cached already are
        touched), evicting least recently used leaves to stay within the bound."""
        parent = None
        for start in range(0, len(prompt) - self.block + 1, self.block):
            key = (owner, parent.number if parent else 0, tuple(prompt[start:start + self.block]))
            node = self.nodes.get(key)
            if node is None:
                if not self._make_room(keep=parent):
                    return
                self._numbers += 1
                columns = slice(start, start + self.block)
                node = Block(self._numbers, key, {name: array[row, :, columns].copy()
                                                  for name, array in pool.arrays.items()}, parent)
                self.nodes[key] = node
                if parent is not None:
                    parent.children += 1
            self._use(node)
            parent = node

    def drop(self, owner: int) -> None:
        """Forget an owner's blocks (its adapter was unloaded)."""
        for key in [k for k in self.nodes if k[0] == owner]:
            del self.nodes[key]

    def _use(self, node: Block) -> None:
        self._clock += 1
        node.used = self._clock
        if node.children == 0:
            self._push(node)

    def _push(self, leaf: Block) -> None:
        heapq.heappush(self._leaves, (leaf.used, leaf.number, leaf.key))
        if len(self._leaves) > 4 * len(self.nodes) + 64:  # mostly stale: rebuilt from the leaves
            self._leaves = [(n.used, n.number, n.key) for n in self.nodes.values() if n.children == 0]
            heapq.heapify(self._leaves)

    def _current(self, entry: tuple[int, int, Key]) -> Block | None:
        """The leaf a heap entry stands for, if it is still a leaf last used then."""
        used, number, key = entry
        node = self.nodes.get(key)
        ok = node is not None and node.number == number and node.used == used and node.children == 0
        return node if ok else None

    def _make_room(self, keep: Block | None) -> bool:
        """Evict least recently used leaves (not ``keep``, the block about to get a child) until one more
        block fits; False when none can go."""
        kept = []
        while self.tokens + self.block > self.max_tokens:
            if not self._leaves:
                break
            entry = heapq.heappop(self._leaves)
            leaf = self._current(entry)
            if leaf is None:
                continue
            if leaf is keep:
                kept.append(entry)
                continue
            del self.nodes[leaf.key]
            parent = leaf.parent
            if parent is not None:
                parent.children -= 1
                if parent.children == 0 and parent.key in self.nodes:
                    self._push(parent)
        for entry in kept:
            heapq.heappush(self._leaves, entry)
        return self.tokens + self.block <= self.max_tokens
