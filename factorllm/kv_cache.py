"""Slot-based KV cache: one preallocated row of `max_len` positions per concurrent sequence.

A step's batch is described by a `CacheBatch`: for each row, its cache slot, the position of
its first new token, and how many of its T (padded) tokens are real. Rows of one step may have
different lengths and positions, which is what continuous batching needs.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class CacheBatch:
    slots: torch.Tensor    # [B] cache slot of each row
    starts: torch.Tensor   # [B] position of each row's first new token
    lengths: torch.Tensor  # [B] real (unpadded) new tokens of each row

    @classmethod
    def build(cls, slots: list[int], starts: list[int], lengths: list[int], device) -> "CacheBatch":
        as_t = lambda v: torch.tensor(v, dtype=torch.long, device=device)  # noqa: E731
        batch = cls(as_t(slots), as_t(starts), as_t(lengths))
        T = max(lengths)
        t = torch.arange(T, device=device)
        valid = t[None, :] < batch.lengths[:, None]                       # [B, T]
        batch.write_rows, batch.write_cols = valid.nonzero(as_tuple=True)
        batch.write_slots = batch.slots[batch.write_rows]
        batch.write_pos = batch.starts[batch.write_rows] + batch.write_cols
        batch.span = max(s + n for s, n in zip(starts, lengths))
        batch.positions = batch.starts[:, None] + t[None, :]               # [B, T]
        keys = torch.arange(batch.span, device=device)
        # Query t of row b sees keys 0..starts[b]+t; padded queries see a harmless prefix.
        batch.mask = (keys[None, None, :] <= batch.positions[:, :, None])[:, None]  # [B,1,T,span]
        return batch

    def attention_mask(self, T: int) -> torch.Tensor:
        return self.mask


class KVCache:
    """Keys and values of every layer for `num_slots` sequences of up to `max_len` tokens."""

    def __init__(self, num_layers: int, num_slots: int, max_len: int, kv_heads: int, head_dim: int,
                 dtype=torch.float32, device="cpu"):
        shape = (num_layers, num_slots, max_len, kv_heads, head_dim)
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
        """Store the real new keys/values, return every row's keys/values up to the batch span."""
        self.k[layer, batch.write_slots, batch.write_pos] = k[batch.write_rows, batch.write_cols]
        self.v[layer, batch.write_slots, batch.write_pos] = v[batch.write_rows, batch.write_cols]
        return self.k[layer, batch.slots, :batch.span], self.v[layer, batch.slots, :batch.span]
