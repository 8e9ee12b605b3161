"""Continuous batching: which sequences run in the next step, and which KV-cache slot each owns.

Every step runs all sequences that are decoding (one token each) plus prefill chunks, up to
`max_num_batched_tokens` tokens in all: first the unfinished prefills, then newly admitted
requests while a slot is free. A long prompt is split into chunks, so it never stalls the
decodes of the others, and nothing waits for an unrelated request to finish.

Slots are kept compact: when a sequence leaves, the sequence in the highest slot moves into the
hole (one copy of its cache). Decoding rows then occupy a contiguous range of slots and the
attention reads the cache as a view, instead of gathering every row's keys each step.

Prefix caching: a free slot keeps the keys and values of the sequence that left it (compaction
swaps it to the top rather than overwriting it), until a new sequence needs the slot. A new
prompt that starts with tokens some free slot holds (a chat's next turn, a shared system prompt)
takes that slot and skips their prefill.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Callable


@dataclass
class StepPlan:
    decodes: list = field(default_factory=list)     # sequences decoding one token, ascending slot
    prefills: list = field(default_factory=list)    # (sequence, number of prompt tokens) chunks

    def __bool__(self) -> bool:
        return bool(self.decodes or self.prefills)

    @property
    def sequences(self) -> list:
        return self.decodes + [s for s, _ in self.prefills]


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class Scheduler:
    """Sequences need: `slot`, `num_computed` (tokens in the cache), `prompt_ids`, `num_tokens`
    (prompt + generated), `finished`, `cached_ids()` (the tokens whose keys and values are in its
    slot) and `reuses_cache` (False where every prompt position must be computed, e.g. for prompt
    log-probabilities)."""

    # A prefill always gets at least this many tokens per step, however many rows decode.
    MIN_PREFILL_CHUNK = 32
    # Shorter shared prefixes are not worth the copies a slot swap costs.
    MIN_PREFIX_HIT = 16

    def __init__(self, num_slots: int, max_num_batched_tokens: int,
                 move_slot: Callable[[int, int, int], None],
                 swap_slots: Callable[[int, int, int, int], None] | None = None):
        """`move_slot(src, dst, length)` copies a slot's first positions; `swap_slots(a, b,
        len_a, len_b)` exchanges two slots' contents (None: no prefix caching)."""
        self.num_slots = num_slots
        self.max_num_batched_tokens = max_num_batched_tokens
        self.move_slot, self.swap_slots = move_slot, swap_slots
        self.waiting: deque = deque()
        self.running: list = []        # admitted, in admission order
        self.owner: list = [None] * num_slots
        self.cached: dict[int, list[int]] = {}  # free slot -> the token ids whose keys/values it holds
        self.prefix_queries = 0        # prompt tokens looked up in the prefix cache
        self.prefix_hits = 0           # of them, found there (their prefill skipped)

    @property
    def num_free_slots(self) -> int:
        return self.num_slots - len(self.running)

    def add(self, seq) -> None:
        self.waiting.append(seq)

    def remove(self, seq) -> None:
        """Forget a sequence (finished or aborted); its slot is free at once."""
        if seq in self.running:
            self.running.remove(seq)
            self.owner[seq.slot] = None
            if self.swap_slots is not None and seq.num_computed > 0:
                self.cached[seq.slot] = seq.cached_ids()
            seq.slot = None
        else:
            try:
                self.waiting.remove(seq)
            except ValueError:
                pass

    def compact(self) -> None:
        """Move the highest-slot sequences into holes so that used slots are 0..n-1."""
        n = len(self.running)
        holes = [s for s in range(n) if self.owner[s] is None]
        for dst in holes:
            src = max(s for s in range(n, self.num_slots) if self.owner[s] is not None)
            seq = self.owner[src]
            left = self.cached.pop(dst, None)
            if left is None:
                self.move_slot(src, dst, seq.num_computed)
            else:  # keep what the leaving sequence computed, now in the vacated top slot
                self.swap_slots(src, dst, seq.num_computed, len(left))
                self.cached[src] = left
            self.owner[dst], self.owner[src], seq.slot = seq, None, dst

    def _reuse_prefix(self, seq, slot: int) -> None:
        """Before `seq` takes free `slot`: bring the free slot holding the longest prefix of its
        prompt there and count those tokens computed (all but the last prompt token, whose
        logits the first sampled token needs)."""
        if self.swap_slots is None:  # prefix caching off
            return
        prompt = seq.prompt_ids
        self.prefix_queries += len(prompt)
        best, hit = None, 0
        if seq.reuses_cache:
            for s, ids in self.cached.items():
                n = min(common_prefix(ids, prompt), len(prompt) - 1)
                if n > hit:
                    best, hit = s, n
        if best is None or hit < self.MIN_PREFIX_HIT:
            self.cached.pop(slot, None)  # overwritten by this prefill
            return
        ids = self.cached.pop(best)
        if best != slot:
            other = self.cached.pop(slot, None)
            self.swap_slots(best, slot, len(ids), len(other) if other else 0)
            if other is not None:
                self.cached[best] = other
        seq.num_computed = hit
        self.prefix_hits += hit

    def schedule(self) -> StepPlan:
        self.compact()
        plan = StepPlan()
        plan.decodes = sorted((s for s in self.running if s.num_computed >= len(s.prompt_ids)),
                              key=lambda s: s.slot)
        budget = max(self.max_num_batched_tokens - len(plan.decodes),
                     min(self.MIN_PREFILL_CHUNK, self.max_num_batched_tokens))
        for seq in self.running:
            if budget <= 0:
                return plan
            left = len(seq.prompt_ids) - seq.num_computed
            if left > 0:
                n = min(left, budget)
                plan.prefills.append((seq, n))
                budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.num_slots:
            seq = self.waiting.popleft()
            seq.slot = len(self.running)   # compact: the first free slot
            self._reuse_prefix(seq, seq.slot)
            self.owner[seq.slot] = seq
            self.running.append(seq)
            n = min(len(seq.prompt_ids) - seq.num_computed, budget)
            plan.prefills.append((seq, n))
            budget -= n
        return plan
