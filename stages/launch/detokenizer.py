"""Incremental detokenization: the text each new token adds, without re-decoding the whole sequence.

A window of a few earlier tokens is decoded with and without the new ones, and the difference is the new
text, so tokenizers whose pieces depend on their neighbours (SentencePiece's leading spaces, byte-level BPE
splitting a character over several tokens) come out right. Text ending in U+FFFD (an incomplete UTF-8
character) is held back until the next token completes it; the engine drops what is still held back when a
sequence ends, as vLLM does (`flush()` gives it, for comparisons with a full decode).
"""

from __future__ import annotations

_CONTEXT = 5  # prompt tokens decoded as context before the first new token


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_ids: list[int], skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self.ids = list(prompt_ids[-_CONTEXT:])
        self.prefix_offset = 0  # start of the context window in self.ids
        self.read_offset = len(self.ids)  # tokens before this are already in the text

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip)

    def add(self, token_id: int) -> str:
        """Append one token; return the text it completes (maybe "")."""
        self.ids.append(token_id)
        return self._advance(final=False)

    def flush(self) -> str:
        """At the end: whatever is still held back, incomplete characters included."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        if self.read_offset >= len(self.ids):
            return ""
        before = self._decode(self.ids[self.prefix_offset : self.read_offset])
        after = self._decode(self.ids[self.prefix_offset :])
        if len(after) > len(before) and (final or not after.endswith("\ufffd")):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return after[len(before) :]
        return ""
