"""Incremental detokenization with stop strings.

Decoding token by token is wrong for byte-level BPE (a character may span tokens) and for
tokenizers that merge spaces, so each step decodes a short window of ids twice, as vLLM does:
the text of the window before and after the new ids; the difference is the new text. A
window that ends in U+FFFD is an incomplete UTF-8 character: hold it back until the next id.

Stop strings: the text is searched for every stop string (only where a new match can start);
text that could still become the start of a stop string is held back, so a client never sees
part of a stop string.
"""
from __future__ import annotations


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_ids: list[int], stop: list[str] | None = None,
                 skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self.ids = list(prompt_ids[-6:])          # a little prompt context for the first tokens
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.stop = [s for s in (stop or []) if s]
        self.max_stop = max((len(s) for s in self.stop), default=0)
        self.text = ""      # all generated text so far (truncated at a stop string)
        self.sent = 0       # characters of `text` already handed out

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip)

    def add(self, token_id: int, check_stop: bool = True) -> tuple[str, str | None]:
        """Append one id; return (text to emit now, the stop string matched or None)."""
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.text += full[len(prefix):]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        matched = None
        if self.stop and check_stop:
            # A new match must end inside the new text: search only the tail that can hold it.
            start = max(0, self.sent - self.max_stop)
            best = None
            for s in self.stop:
                i = self.text.find(s, start)
                if i >= 0 and (best is None or i < best[0]):
                    best = (i, s)
            if best is not None:
                self.text = self.text[:best[0]]
                matched = best[1]
        return self._take(final=matched is not None), matched

    def _take(self, final: bool) -> str:
        end = len(self.text)
        if not final and self.stop:
            end -= self._held_back()
        end = max(end, self.sent)
        out = self.text[self.sent:end]
        self.sent = end
        return out

    def _held_back(self) -> int:
        """Length of the longest suffix of the text that is a proper prefix of a stop string."""
        for n in range(min(self.max_stop - 1, len(self.text) - self.sent), 0, -1):
            tail = self.text[-n:]
            if any(s.startswith(tail) for s in self.stop):
                return n
        return 0

    def flush(self) -> str:
        """At the end (not by a stop string): everything not yet handed out."""
        return self._take(final=True)
