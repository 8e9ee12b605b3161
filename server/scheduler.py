"""Continuous batching: which sequences run in the next step, and which KV-cache slot each owns.

Every step runs all sequences that are decoding (one token each) plus prefill chunks, up to
`max_num_batched_tokens` tokens in all: first the unfinished prefills, then newly admitted
requests while a slot is free. A long prompt is split into chunks, so it never stalls the
decodes of the others, and nothing waits for an unrelated request to finish.

Slots are kept compact: when a sequence leaves, the sequence in the highest slot moves into the
hole (one copy of its cache). Decoding rows then occupy a contiguous range of slots and the
attention reads the cache as a view, instead of gathering every row's keys each step.
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


class Scheduler:
    """Sequences need: `slot`, `num_computed` (tokens in the cache), `prompt_ids`, `num_tokens`
    (prompt + generated), `finished`."""

    # A prefill always gets at least this many tokens per step, however many rows decode.
    MIN_PREFILL_CHUNK = 32

    def __init__(self, num_slots: int, max_num_batched_tokens: int,
                 move_slot: Callable[[int, int, int], None]):
        self.num_slots = num_slots
        self.max_num_batched_tokens = max_num_batched_tokens
        self.move_slot = move_slot
        self.waiting: deque = deque()
        self.running: list = []        # admitted, in admission order
        self.owner: list = [None] * num_slots

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
            self.move_slot(src, dst, seq.num_computed)
            self.owner[dst], self.owner[src], seq.slot = seq, None, dst

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
            self.owner[seq.slot] = seq
            self.running.append(seq)
            n = min(len(seq.prompt_ids), budget)
            plan.prefills.append((seq, n))
            budget -= n
        return plan
