"""Slot-based KV cache: one preallocated row of `max_len` positions per concurrent sequence.

A step's batch is described by a `CacheBatch`: for each row, its cache slot, the position of
its first new token, and how many of its T (padded) tokens are real. Rows of one step may have
different lengths and positions, which is what continuous batching needs.

Speed notes (the engine's decode loop runs this every step):
  * the batch's index tensors are built on the host and copied once (pinned, non-blocking on
    CUDA), so `build` never synchronizes with the device;
  * when the rows' slots form an ascending contiguous range (the engine keeps them compact),
    `update` returns views of the cache instead of gathering every row's keys and values;
  * the layout is head-major, `[layer, slot, kv_head, position, head_dim]`: each head's keys
    of a row are one contiguous block, so CPU bf16 decode attention (oneDNN batched matmuls,
    which copy a batch that is not one strided tensor) copies blocks instead of gathering
    strided rows, and never transposes them (position-major: 1.4x slower per layer at 32 rows
    x 200 positions, 1.9x at 600).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


def _to_device(values: list[int], device) -> torch.Tensor:
    t = torch.tensor(values, dtype=torch.long)
    if torch.device(device).type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t


@dataclass
class CacheBatch:
    slots: torch.Tensor    # [B] cache slot of each row
    starts: torch.Tensor   # [B] position of each row's first new token
    lengths: torch.Tensor  # [B] real (unpadded) new tokens of each row

    @classmethod
    def build(cls, slots: list[int], starts: list[int], lengths: list[int], device) -> "CacheBatch":
        slots, starts, lengths = [int(s) for s in slots], [int(s) for s in starts], [int(n) for n in lengths]
        B, T = len(slots), max(lengths)
        # Everything index-like is computed here on the host: no device round trips.
        rows = [b for b in range(B) for _ in range(lengths[b])]
        cols = [t for b in range(B) for t in range(lengths[b])]
        packed = _to_device(slots + starts + lengths + rows + cols
                            + [slots[r] for r in rows] + [starts[r] + c for r, c in zip(rows, cols)], device)
        n = len(rows)
        batch = cls(packed[:B], packed[B:2 * B], packed[2 * B:3 * B])
        o = 3 * B
        batch.write_rows, batch.write_cols = packed[o:o + n], packed[o + n:o + 2 * n]
        batch.write_slots, batch.write_pos = packed[o + 2 * n:o + 3 * n], packed[o + 3 * n:o + 4 * n]
        batch.span = max(s + l for s, l in zip(starts, lengths))
        batch.host_slots, batch.host_starts, batch.host_lengths = slots, starts, lengths
        contiguous = slots == list(range(slots[0], slots[0] + B))
        batch.slot_range = (slots[0], slots[0] + B) if contiguous else None
        t = torch.arange(T, device=device)
        batch.positions = batch.starts[:, None] + t[None, :]               # [B, T]
        # Mask choice: no mask when every query sees every cached key (decode rows at one
        # position); plain causal when the rows are whole sequences from position 0; else explicit.
        batch.is_causal = False
        if T == 1 and len(set(starts)) == 1:
            batch.mask = None
        elif all(s == 0 for s in starts) and len(set(lengths)) == 1:
            batch.mask, batch.is_causal = None, True
        else:
            keys = torch.arange(batch.span, device=device)
            # Query t of row b sees keys 0..starts[b]+t; padded queries see a harmless prefix.
            batch.mask = (keys[None, None, :] <= batch.positions[:, :, None])[:, None]  # [B,1,T,span]
        return batch

    def attention_mask(self, T: int) -> torch.Tensor | None:
        return self.mask


class KVCache:
    """Keys and values of every layer for `num_slots` sequences of up to `max_len` tokens."""

    def __init__(self, num_layers: int, num_slots: int, max_len: int, kv_heads: int, head_dim: int,
                 dtype=torch.float32, device="cpu"):
        shape = (num_layers, num_slots, kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.num_slots, self.max_len = num_slots, max_len

    @classmethod
    def for_model(cls, model, num_slots: int, max_len: int) -> "KVCache":
        cfg = model.config
        p = model.lm_head.weight
        return cls(cfg.num_hidden_layers, num_slots, max_len, cfg.num_key_value_heads, cfg.head_dim,
                   dtype=p.dtype, device=p.device)

    @staticmethod
    def bytes_per_slot(model, max_len: int) -> int:
        cfg = model.config
        elem = model.lm_head.weight.element_size()
        return 2 * cfg.num_hidden_layers * max_len * cfg.num_key_value_heads * cfg.head_dim * elem

    def update(self, layer: int, batch: CacheBatch, k: torch.Tensor, v: torch.Tensor):
        """Store the real new keys/values k, v [B, T, kv_heads, D]; return every row's keys and
        values up to the batch span, head-major: [B, kv_heads, span, D]."""
        B, T = k.shape[:2]
        if B == 1:  # one row: plain slice copies
            s, start, n = batch.host_slots[0], batch.host_starts[0], batch.host_lengths[0]
            self.k[layer, s, :, start:start + n] = k[0, :n].transpose(0, 1)
            self.v[layer, s, :, start:start + n] = v[0, :n].transpose(0, 1)
        elif T == 1:  # decode rows: one position each, no padding
            self.k[layer, batch.write_slots, :, batch.write_pos] = k[:, 0]
            self.v[layer, batch.write_slots, :, batch.write_pos] = v[:, 0]
        else:
            self.k[layer, batch.write_slots, :, batch.write_pos] = k[batch.write_rows, batch.write_cols]
            self.v[layer, batch.write_slots, :, batch.write_pos] = v[batch.write_rows, batch.write_cols]
        r = getattr(batch, "slot_range", None)
        if r is not None:  # views, no copy
            return self.k[layer, r[0]:r[1], :, :batch.span], self.v[layer, r[0]:r[1], :, :batch.span]
        return self.k[layer, batch.slots, :, :batch.span], self.v[layer, batch.slots, :, :batch.span]

    def swap_slots(self, a: int, b: int, len_a: int, len_b: int) -> None:
        """Exchange two slots' first positions (`len_a` of a's, `len_b` of b's)."""
        n = max(len_a, len_b)
        if n > 0 and a != b:
            for t in (self.k, self.v):
                t[:, [a, b], :, :n] = t[:, [b, a], :, :n]

    def move_slot(self, src: int, dst: int, length: int) -> None:
        """Copy a sequence's first `length` positions to another slot (the engine compacts slots)."""
        if length > 0 and src != dst:
            self.k[:, dst, :, :length] = self.k[:, src, :, :length]
            self.v[:, dst, :, :length] = self.v[:, src, :, :length]
