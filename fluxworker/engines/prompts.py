"""Prompt embeddings kept for reuse, so a repeated prompt skips both text encoders.

The embeddings are exactly what the encoders return for the prompt; the pipeline gets them instead
of the text, so an image made from a cached prompt is the image the text would have made.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Hashable


class PromptCache:
    """The ``size`` most recently used prompts and their (T5 embeddings, pooled CLIP embedding).
    Keys are whatever identifies the encoding: the engine uses (prompt, T5 token count)."""

    def __init__(self, size: int):
        self.size = size
        self._entries: OrderedDict[Hashable, tuple] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, key: Hashable):
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return entry

    def put(self, key: Hashable, embeddings: tuple) -> None:
        if self.size <= 0:
            return
        self._entries[key] = embeddings
        self._entries.move_to_end(key)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)
