"""The prefix cache's bound against a direct model of its rule: after any sequence of inserts and
matches, the blocks cached are those a cache that walks its blocks in least-recently-used order and
evicts the first leaf (not the block about to get a child) would keep."""

from __future__ import annotations

from collections import OrderedDict
from types import SimpleNamespace

import numpy as np

from prolora_export.engine.prefix import PrefixCache

BLOCK = 2


class Model:
    """The rule, directly: every block in use order, a walk to the first leaf to evict."""

    def __init__(self, max_tokens: int):
        self.max_tokens = max_tokens
        self.nodes: OrderedDict[tuple, dict] = OrderedDict()  # key -> {"parent": key | None, "children": n}

    def match(self, owner: int, prompt: list[int]) -> list[tuple]:
        found, parent = [], ()
        for start in range(0, len(prompt) - BLOCK, BLOCK):
            key = (owner, parent, tuple(prompt[start:start + BLOCK]))
            if key not in self.nodes:
                break
            self.nodes.move_to_end(key)
            found.append(key)
            parent = key
        return found

    def insert(self, owner: int, prompt: list[int]) -> None:
        parent = None
        for start in range(0, len(prompt) - BLOCK + 1, BLOCK):
            key = (owner, parent or (), tuple(prompt[start:start + BLOCK]))
            if key not in self.nodes:
                while (len(self.nodes) + 1) * BLOCK > self.max_tokens:
                    leaf = next((k for k, n in self.nodes.items() if n["children"] == 0 and k != parent), None)
                    if leaf is None:
                        return
                    gone = self.nodes.pop(leaf)
                    if gone["parent"] is not None:
                        self.nodes[gone["parent"]]["children"] -= 1
                self.nodes[key] = {"parent": parent, "children": 0}
                if parent is not None:
                    self.nodes[parent]["children"] += 1
            self.nodes.move_to_end(key)
            parent = key


def paths(cache: PrefixCache) -> set[tuple]:
    """Each cached block as the model names it: its owner, its parent's name, its tokens."""
    def name(block) -> tuple:
        return (block.key[0], name(block.parent) if block.parent else (), block.key[2])
    return {name(b) for b in cache.nodes.values()}


def test_evictions_follow_the_least_recently_used_leaf_rule() -> None:
    rng = np.random.default_rng(0)
    pool = SimpleNamespace(arrays={"k": np.zeros((1, 1, 64, 1), np.float32)})
    for max_tokens in (6, 12, 40):
        cache, model = PrefixCache(BLOCK, max_tokens), Model(max_tokens)
        for _ in range(600):
            owner = int(rng.integers(0, 2))
            prompt = rng.integers(0, 3, int(rng.integers(2, 24))).tolist()  # 3 tokens: shared prefixes
            if rng.random() < 0.5:
                cache.insert(owner, prompt, pool, 0)
                model.insert(owner, prompt)
            else:
                got = cache.match(owner, prompt)
                assert len(got) == len(model.match(owner, prompt))
            assert paths(cache) == set(model.nodes) and cache.tokens <= max_tokens
        assert len(cache._leaves) <= 4 * len(cache.nodes) + 65, "stale heap entries are dropped"
