"""The factorized FFN: N experts cut from a dense gated MLP, a linear router, top-k dispatch.

Expert e owns E = intermediate/N neurons: rows of gate_proj/up_proj and columns of down_proj.
Weights are stacked per layer as `experts_gate [N, E, H]`, `experts_up [N, E, H]` and
`experts_down [N, E, H]` (ready for grouped kernels and export). At inference gate and up run as
one matmul per expert on a fused `[N, 2E, H]` tensor (see `gate_up`); the dispatch paths that
run the experts are methods named in DISPATCH_PATHS, but for `native`, the C kernel
(factorllm/native_moe.py) that routes and runs the whole layer in one call. Optional shared neurons
form an always-on dense `GatedMLP`.

Gates (a documented choice, all exact at K = N):
  * "sum":    y = sum of the K chosen experts (scale 1). Default: unchosen experts contribute
              little, so scaling up the chosen ones only amplifies their error.
  * "scaled": y = N/K * sum of the K chosen experts (the paper's released code).
  * "weighted": y = sum_i K * p_i / sum_topk(p) * E_i(x), renormalized router probabilities,
              scaled so the weights average 1; exact at K = N only when routing is uniform.
In training, the hard gates carry a straight-through term (value 1, gradient of p) so that
end-to-end distillation can update the router too.
"""
from __future__ import annotations

import time
from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from . import native_moe
from .model import GatedMLP, activation
from .timing import doubling_counts, median_in_turns, planned

GATES = ("sum", "scaled", "weighted")
# Ways to run the experts on a batch (methods of MoEFFN); `tune_dispatch` picks one per batch size.
# "kernels" needs the per-expert kernels that `pack` builds (see available_paths).
# "native" needs the C kernel's weights (factorllm/native_moe.py), which `pack` builds where it runs.
DISPATCH_PATHS = ("grouped", "looped", "padded", "masked", "gathered", "kernels", "native")
# A plan's `padded` gives way to `grouped` when padding would exceed this many rows per (token,
# expert) pair: real text routes far less evenly than the random inputs tune_dispatch times
# (docs/results.md, session 14).
MAX_PADDING = 3.0
# For the same reason tune_dispatch takes `grouped` or `padded` over `masked` (whose cost does not
# depend on the routing) only when they time this much faster on its evenly routed random inputs:
# on real text, prefill of 16 prompts ran up to 1.5x slower through their picks than through
# `masked` (docs/results.md, session 19).
SKEW_MARGIN = 1.2
# Routing records a layer keeps for `routing_stats`; past this many it counts them itself (a
# model run with statistics on that nobody reads stays bounded).
MAX_PENDING = 64


def routing_stats(moes: list["MoEFFN"]) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens per expert [L, N] and the sum of the router's entropy (nats) [L] over the routing
    records that the layers (all with N experts) kept since the last call, and what the C kernel
    counted itself (`stats_in_kernel`); both are used up. A few ops for all layers and forwards
    together: counting in each layer's forward cost ~70 us a layer at decode sizes (two dozen
    small ops), ~2 ms a step of the default model; these ops cost ~1 ms a step in the engine,
    the C kernel's counting nothing measurable."""
    N, device = moes[0].num_experts, moes[0].router.weight.device
    records = [(i, logits, idx) for i, m in enumerate(moes) for logits, idx in m.pending_stats]
    for m in moes:
        m.pending_stats = []
    counts = torch.zeros(len(moes) * N, dtype=torch.long, device=device)
    entropy = torch.zeros(len(moes), dtype=torch.float64, device=device)
    counted = [(i, m) for i, m in enumerate(moes) if m.kernel_counted]
    if counted:
        rows = torch.tensor([i for i, _ in counted], device=device)
        counts.view(len(moes), N).index_add_(0, rows, torch.stack([m.kernel_counts for _, m in counted]))
        entropy.index_add_(0, rows, torch.cat([m.kernel_entropy for _, m in counted]))
        torch._foreach_zero_([t for _, m in counted for t in (m.kernel_counts, m.kernel_entropy)])
        for _, m in counted:
            m.kernel_counted = False
    if not records:
        return counts.view(len(moes), N), entropy
    layer = torch.tensor([i for i, _, _ in records], device=device)
    rows = torch.tensor([logits.shape[0] for _, logits, _ in records], device=device)
    picks = torch.tensor([idx.numel() for _, _, idx in records], device=device)
    logits = torch.cat([logits for _, logits, _ in records]).float()
    entropy.index_add_(0, layer.repeat_interleave(rows, output_size=logits.shape[0]),
                       torch.special.entr(logits.softmax(-1)).sum(-1).double())
    expert = torch.cat([idx.flatten() for _, _, idx in records])
    expert += layer.repeat_interleave(picks, output_size=expert.numel()) * N
    counts.index_add_(0, expert, torch.ones_like(expert))
    return counts.view(len(moes), N), entropy


class MoEFFN(nn.Module):
    def __init__(self, hidden: int, expert_size: int, num_experts: int, top_k: int,
                 shared_size: int = 0, act: str = "silu", gate: str = "sum"):
        super().__init__()
        if gate not in GATES:
            raise ValueError(f"gate must be one of {GATES}, got {gate!r}")
        self.num_experts, self.gate = num_experts, gate
        self.act_name = act
        self.act = activation(act)
        self.router = nn.Linear(hidden, num_experts, bias=False)
        self.experts_gate = nn.Parameter(torch.empty(num_experts, expert_size, hidden))
        self.experts_up = nn.Parameter(torch.empty(num_experts, expert_size, hidden))
        self.experts_down = nn.Parameter(torch.empty(num_experts, expert_size, hidden))
        self.shared = GatedMLP(hidden, shared_size, act) if shared_size else None
        # Also an empty dispatch_plan: [(max_tokens, path)], ascending, the dispatch path to use up
        # to each token count, measured by tune_dispatch; beyond the last entry, the last entry's
        # path; untuned, `sorted_path` (path_for).
        self.set_top_k(top_k)
        self.collect_stats = True
        # Let the C kernel count tokens per expert and router entropy itself (`routed`): engines
        # turn it on for forwards without padding rows (decode steps), which records would drop.
        self.stats_in_kernel = False
        self.time_experts = False
        # Engine hook: keep the last forward's expert choices (per-request routing traces).
        self.record_routing = False
        self._gate_up: tuple[torch.Tensor, tuple[int, int]] | None = None  # see gate_up
        self.packed: tuple[Callable, Callable, int] | None = None  # see pack
        self.expert_kernels: list[tuple[Callable, Callable]] | None = None  # see pack
        self.native: native_moe.NativeMoE | None = None  # see pack
        self.shared_packed = False
        self.router_packed = False  # see pack
        self.last_idx: torch.Tensor | None = None
        self.reset_stats()

    @property
    def expert_size(self) -> int:
        return self.experts_gate.shape[1]

    def gate_up(self) -> torch.Tensor:
        """[N, 2E, H]: each expert's gate rows, then its up rows, so that one matmul computes both.

        Built once from experts_gate/experts_up, which then become views of it: no second copy,
        and in-place updates (load_state_dict, copy_, an optimizer step) reach it. A parameter
        given a new tensor (.to(), loading with assign=True) is noticed and it is rebuilt. While
        those parameters train, it is concatenated afresh so that gradients reach them."""
        g, u = self.experts_gate, self.experts_up
        if torch.is_grad_enabled() and (g.requires_grad or u.requires_grad):
            return torch.cat([g, u], 1)
        if self._gate_up is None or (g.data_ptr(), u.data_ptr()) != self._gate_up[1]:
            with torch.inference_mode(False):  # a normal tensor: the parameters stay usable for training
                gu = torch.cat([g.detach(), u.detach()], 1)
            g.data, u.data = gu[:, :g.shape[1]], gu[:, g.shape[1]:]
            self._gate_up = gu, (g.data_ptr(), u.data_ptr())
        return self._gate_up[0]

    @property
    def packed_expert_columns(self) -> int:
        """Output columns of the packed gate/up matmul that belong to experts (routed and shared,
        gates then ups); the router's logits, when packed in, follow them (see `pack`)."""
        return 2 * (self.num_experts + self.packed[2]) * self.expert_size

    def all_expert_hidden(self, x: torch.Tensor) -> torch.Tensor:
        """Every routed expert's hidden activations on every token of x [T, H], [T, N, E], in one
        matmul (fitting evaluates all experts; serving never does)."""
        N, E, H = self.experts_down.shape
        gu = F.linear(x, self.gate_up().reshape(N * 2 * E, H)).view(-1, N, 2, E)
        return self.act(gu[:, :, 0]) * gu[:, :, 1]

    @property
    def shared_joins_experts(self) -> bool:
        """Shared neurons that form whole expert-sized groups: `pack` runs them with the experts."""
        return self.shared is not None and self.shared.gate_proj.out_features % self.expert_size == 0

    def pack(self, kernel: Callable[[torch.Tensor], Callable] | None,
             down_kernel: Callable[[torch.Tensor], Callable] | None = None, route_in_masked: bool = True) -> None:
        """Inference engines: run the masked path's two matmuls through `kernel(weight [out, in])`,
        a callable computing x @ weight.T (the engine's prepacked oneDNN linears,
        factorllm/kernels.py, ~1.3-1.9x faster than plain matmuls at decode sizes); None goes back
        to plain matmuls. Shared
        neurons that form whole expert-sized groups join as always-on experts, so that the masked
        path is one matmul pair, the dense FFN's. Each routed expert also gets its own kernel pair,
        for the `kernels` path (`use_plan` lets them go if the plan never takes it). `down_kernel`
        (default: `kernel`) builds the down projections' kernels (int8 weights share row scales
        across experts, see factorllm/quantize.py). With `route_in_masked`, the masked path's
        first matmul also computes the router logits (its weight's last N rows, in the kernel's
        dtype): one kernel call instead of the router's own fp32 call and the casts around it,
        ~50 us less per layer at decode sizes (docs/results.md, session 19). The kernels hold
        their own copy of the weights: pack again after changing them. Where the C kernel runs
        (factorllm/native_moe.py), the layer also gets its weights for the `native` path,
        whatever `kernel` is."""
        self.packed, self.shared_packed, self.expert_kernels = None, False, None
        self.router_packed = False
        self.native = native_moe.pack(self) if not self.keeps_every_expert and native_moe.usable(self) else None
        if kernel is None:  # a tuned plan's `kernels` entries fall back to `masked`
            self.dispatch_plan = [(n, "masked" if p == "kernels" else p) for n, p in self.dispatch_plan]
            return
        N, E, H = self.experts_down.shape
        down_kernel = down_kernel or kernel
        with torch.no_grad():
            if not self.keeps_every_expert:
                gu = self.gate_up()
                self.expert_kernels = [(kernel(gu[e]), down_kernel(self.experts_down[e].t().contiguous()))
                                       for e in range(N)]
            gate, up, down = self.group_weights()
            extra = gate.shape[0] // E - N
            # All gate rows, then all up rows: the activation then reads one contiguous half
            # (on the per-expert interleaved [N, 2E] layout it ran ~4x slower).
            router = []
            if route_in_masked:  # zero rows after the router's keep the output rows 64-byte aligned
                w = self.router.weight.to(gate.dtype)
                router = [w, w.new_zeros(-N % 32, H)]
            gate_up = torch.cat([gate, up, *router])
            self.packed = (kernel(gate_up), down_kernel(down.t().contiguous()), extra)
            self.shared_packed, self.router_packed = extra > 0, route_in_masked

    def group_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Gate rows, up rows and down columns (as rows) [G*E, H] of the routed experts, then of
        the shared neurons where they form whole expert-sized groups: what `pack`'s masked
        matmuls and the C kernel (factorllm/native_moe.py) run as G groups."""
        N, E, H = self.experts_down.shape
        gates, ups = [self.experts_gate.reshape(N * E, H)], [self.experts_up.reshape(N * E, H)]
        downs = [self.experts_down.reshape(N * E, H)]
        if self.shared_joins_experts:
            sh = self.shared
            gates.append(sh.gate_proj.weight)
            ups.append(sh.up_proj.weight)
            downs.append(sh.down_proj.weight.t())
        return torch.cat(gates), torch.cat(ups), torch.cat(downs)

    def _apply(self, fn, recurse=True):
        self._gate_up = None  # .to()/.cuda() give the parameters new tensors: let the old one go
        return super()._apply(fn, recurse)

    def reset_stats(self) -> None:
        device = self.router.weight.device
        # Normal tensors even when called under inference mode (the engine's warm-up), so that the
        # same model can still run outside it afterwards (in-place updates of inference tensors fail).
        with torch.inference_mode(False):
            self._token_counts = torch.zeros(self.num_experts, dtype=torch.long, device=device)
            self._entropy_sum = torch.zeros((), dtype=torch.float64, device=device)
            self.kernel_counts = torch.zeros(self.num_experts, dtype=torch.long, device=device)
            self.kernel_entropy = torch.zeros(1, dtype=torch.float64, device=device)
        self.kernel_counted = False  # since the last routing_stats
        self.pending_stats: list[tuple[torch.Tensor, torch.Tensor]] = []  # (logits, idx) per forward
        self.expert_seconds = [0.0] * self.num_experts
        self.expert_events: list = []  # CUDA: (expert, start, end) events, resolved later

    @property
    def token_counts(self) -> torch.Tensor:
        """Tokens routed to each expert [N] since the last reset (an engine reads `routing_stats`
        of all its layers at once instead)."""
        self._fold_stats()
        return self._token_counts

    @property
    def entropy_sum(self) -> torch.Tensor:
        """Sum of the router's entropy (nats) over the routed tokens since the last reset."""
        self._fold_stats()
        return self._entropy_sum

    def _fold_stats(self) -> None:
        counts, entropy = routing_stats([self])
        self._token_counts += counts[0]
        self._entropy_sum += entropy[0]

    def collect_expert_seconds(self) -> list[float] | None:
        """Seconds per expert since the last call (None if nothing was timed); resets. On CUDA
        this waits for the timed kernels, so the engine only times every Nth step."""
        for e, start, end in self.expert_events:
            end.synchronize()
            self.expert_seconds[e] += start.elapsed_time(end) / 1000.0
        self.expert_events = []
        out = self.expert_seconds
        self.expert_seconds = [0.0] * self.num_experts
        return out if any(out) else None

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Router logits [T, N], chosen experts [T, K] and their gate weights [T, K] for x [T, H]
        (see `choose`)."""
        logits = self.router(x.to(self.router.weight.dtype))  # an engine may keep the router in fp32
        return self.choose(logits, x.dtype)

    def choose(self, logits: torch.Tensor,
               dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The experts and gate weights (in `dtype`) for router logits [T, N]; the weights are None
        when every chosen expert counts once (the "sum" gate at inference), which spares the
        dispatch paths a multiplication. Inference ranks the logits themselves (the softmax keeps
        their order) and leaves the statistics to `routing_stats`."""
        if self.training:
            top_p, idx = logits.float().softmax(-1).topk(self.top_k, dim=-1)
            if self.gate == "weighted":
                weights = self.top_k * top_p / top_p.sum(-1, keepdim=True)
            else:
                scale = self.num_experts / self.top_k if self.gate == "scaled" else 1.0
                weights = scale * (1 + top_p - top_p.detach())
        else:
            top_logits, idx = logits.topk(self.top_k, dim=-1)
            if self.gate == "weighted":
                weights = self.top_k * top_logits.float().softmax(-1)
            elif self.gate == "scaled":
                weights = torch.full_like(top_logits, self.num_experts / self.top_k)
            else:
                weights = None
            self.record(logits, idx)
        return logits, idx, None if weights is None else weights.to(dtype)

    def record(self, logits: torch.Tensor, idx: torch.Tensor, counted: bool = False) -> None:
        """Keep an inference forward's routing for `routing_stats` (and the engine's traces);
        `counted`: the C kernel has already counted it."""
        if self.collect_stats and not counted:
            if len(self.pending_stats) >= MAX_PENDING:
                self._fold_stats()
            self.pending_stats.append((logits.detach(), idx))
        if self.record_routing:
            self.last_idx = idx

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        if self.time_experts:  # timed steps: the C kernel times its experts, else they run one by one
            path = "native" if self.native is not None else "looped"
        elif torch.is_grad_enabled():  # training: see `masked`
            path = "masked"
        else:
            path = self.path_for(flat.shape[0])
        return self.routed(path, flat).view(shape)

    def routed(self, path: str, x: torch.Tensor) -> torch.Tensor:
        """Route x [T, H] and run its experts by `path`: what serving runs, and what
        `tune_dispatch` times. `masked` over packed kernels that hold the router's rows (see
        `pack`) routes in its own matmul; `native` routes in its C call, shared groups included."""
        if path == "native":
            seconds = torch.zeros(self.num_experts, dtype=torch.float64) if self.time_experts else None
            in_kernel = self.collect_stats and self.stats_in_kernel
            stats = (self.kernel_counts, self.kernel_entropy) if in_kernel else (None, None)
            out, logits, idx = self.native(x, self.top_k, seconds, *stats)
            if seconds is not None:
                self.expert_seconds = [a + b for a, b in zip(self.expert_seconds, seconds.tolist())]
            self.kernel_counted |= in_kernel
            self.record(logits, idx, counted=in_kernel)
            return out
        if path == "masked" and self.router_packed:
            out = self.packed[0](x)
            # A copy: the statistics keep the logits until the step ends, and a view would keep
            # all of `out` (at prefill sizes, tens of MB per layer; prefill ran 2.5x slower).
            start = self.packed_expert_columns
            _, idx, weights = self.choose(out[:, start:start + self.num_experts].contiguous(), x.dtype)
            return self.run_path(path, x, idx, weights, out)
        _, idx, weights = self.route(x)
        if path == "padded" and self.padding_ratio(idx) > MAX_PADDING:
            path = self.sorted_path
        return self.run_path(path, x, idx, weights)

    def run_path(self, path: str, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor | None,
                 packed_out: torch.Tensor | None = None) -> torch.Tensor:
        """The layer's output [T, H] by one dispatch path for a given routing, shared experts
        included; `packed_out`: `masked`'s first matmul, already computed (see `routed`)."""
        out = self.masked(x, idx, weights, packed_out) if path == "masked" else getattr(self, path)(x, idx, weights)
        if self.shared is not None and not (path == "masked" and self.shared_packed):
            out = out + self.shared(x)
        return out

    @property
    def keeps_every_expert(self) -> bool:
        """K = N (a dense layer of a per-layer top-k schedule): every path does the dense FFN's
        work, and `masked` does it as the dense FFN does, one matmul pair; nothing to tune."""
        return self.top_k == self.num_experts

    def use_plan(self, plan: list[tuple[int, str]]) -> None:
        """Serve with `plan` (tune_dispatch's, or that of a layer of the same shape) and let the
        per-expert kernels' or the C kernel's weight copies go if it never takes them."""
        self.dispatch_plan = plan
        if all(path != "kernels" for _, path in plan):
            self.expert_kernels = None
        if all(path != "native" for _, path in plan):
            self.native = None

    def set_top_k(self, top_k: int) -> None:
        """Route each token to `top_k` experts from now on (the weights stay as built). The
        dispatch plan and per-expert kernels depend on K: tune and pack again afterwards."""
        if not 1 <= top_k <= self.num_experts:
            raise ValueError(f"top_k must be in [1, {self.num_experts}], got {top_k}")
        self.top_k, self.dispatch_plan = top_k, []

    def padding_ratio(self, idx: torch.Tensor) -> float:
        """Rows of `padded`'s [N, C, H] tensor per (token, expert) pair of this routing."""
        return self.num_experts * int(idx.flatten().bincount(minlength=self.num_experts).max()) / idx.numel()

    def path_for(self, tokens: int) -> str:
        if self.keeps_every_expert:
            return "masked"
        return planned(self.dispatch_plan, tokens, None) or self.sorted_path  # checked only when untuned

    def expert_forward(self, e: int, x: torch.Tensor, w: torch.Tensor | None = None,
                       out: torch.Tensor | None = None) -> torch.Tensor:
        """Expert e on tokens x [n, H]; w [n, 1] scales each token's hidden activations (its gate);
        the result [n, H] is written into `out` when given."""
        g, u = F.linear(x, self.gate_up()[e]).chunk(2, -1)
        h = self.act(g) * u
        if w is not None:
            h = h * w  # [n, E]: cheaper here than on the [n, H] output
        return torch.matmul(h, self.experts_down[e], out=out)

    def sort_by_expert(self, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor | None):
        """The (token, expert) pairs sorted by expert: tokens per expert [N], each pair's token
        [T*K], its input row [T*K, H] and gate weight [T*K, 1] (None for unweighted gates)."""
        flat_idx = idx.flatten()
        order = flat_idx.argsort(stable=True)
        token_of = order // self.top_k
        xs = x.index_select(0, token_of)  # a row copy: several times faster than x[token_of] on CPU
        ws = None if weights is None else weights.flatten()[order, None]
        return flat_idx.bincount(minlength=self.num_experts), token_of, xs, ws

    def grouped(self, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
        """Pairs sorted by expert, then one grouped matmul per projection over all experts
        (`F.grouped_mm`: a single call where a Python loop would issue one matmul chain per
        expert; on CUDA it reads the group offsets on the device, so nothing synchronizes);
        the rows are summed back into their tokens. Inference only (no CPU backward)."""
        counts, token_of, xs, ws = self.sort_by_expert(x, idx, weights)
        offs = counts.cumsum(0).to(torch.int32)
        g, u = F.grouped_mm(xs, self.gate_up().transpose(1, 2), offs=offs).chunk(2, -1)
        h = self.act(g) * u
        if ws is not None:
            h = h * ws
        ys = F.grouped_mm(h, self.experts_down, offs=offs)
        return torch.zeros_like(x).index_add_(0, token_of, ys)

    def looped(self, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
        """Pairs sorted by expert, then a loop over the experts that have tokens, each writing its
        rows of one buffer, summed back into the tokens' rows: the path that can time each expert
        (timed serving steps)."""
        counts, token_of, xs, ws = self.sort_by_expert(x, idx, weights)
        ys = torch.empty_like(xs)
        start = 0
        for e, n in enumerate(counts.tolist()):
            if n == 0:
                continue
            rows = slice(start, start + n)
            start += n
            w = None if ws is None else ws[rows]
            if self.time_experts:
                self.timed_expert_forward(e, xs[rows], w, ys[rows])
            else:
                self.expert_forward(e, xs[rows], w, out=ys[rows])
        return torch.zeros_like(x).index_add_(0, token_of, ys)

    def timed_expert_forward(self, e: int, x: torch.Tensor, w: torch.Tensor | None, out: torch.Tensor) -> None:
        if x.is_cuda:  # events: no synchronization here
            ev = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            ev[0].record()
            self.expert_forward(e, x, w, out=out)
            ev[1].record()
            self.expert_events.append((e, *ev))
        else:
            t0 = time.perf_counter()
            self.expert_forward(e, x, w, out=out)
            self.expert_seconds[e] += time.perf_counter() - t0

    def padded(self, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
        """Each expert's tokens copied into its block of a zero-padded [N, C, H] tensor (C: the
        most tokens any expert got) and two batched matmuls for all experts: a few kernel calls
        in place of a loop, paid for with padding rows (see `padding_ratio`); for batches of a few
        dozen tokens."""
        N, K = self.num_experts, self.top_k
        flat_idx = idx.flatten()
        order = flat_idx.argsort(stable=True)
        expert = flat_idx[order]
        counts = flat_idx.bincount(minlength=N)
        C = int(counts.max())
        # Row of each sorted (token, expert) pair in the padded tensor: its expert's block, then
        # its rank among that expert's pairs.
        slot = expert * C + torch.arange(len(order), device=x.device) - (counts.cumsum(0) - counts)[expert]
        token_of = order // K
        xp = x.new_zeros(N * C, x.shape[1]).index_copy_(0, slot, x.index_select(0, token_of))
        g, u = torch.bmm(xp.view(N, C, -1), self.gate_up().transpose(1, 2)).chunk(2, -1)
        h = self.act(g) * u
        if weights is not None:
            h = h * h.new_zeros(N * C).index_copy_(0, slot, weights.flatten()[order]).view(N, C, 1)
        y = torch.bmm(h, self.experts_down).view(N * C, -1).index_select(0, slot)
        return torch.zeros_like(x).index_add_(0, token_of, y)

    def gathered(self, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
        """Gather each token's K experts' weights (gpt-fast style) and apply them as matrix-vector
        products: only the chosen experts' weights are read, for decoding one or a few tokens.
        The gathered weights are the untransposed operand of each batched matmul (bf16 batched
        matmuls on CPU copy a transposed one)."""
        T, K = idx.shape
        _, E, H = self.experts_down.shape
        gu = torch.bmm(self.gate_up()[idx].view(T, K * 2 * E, H), x[:, :, None]).view(T, K, 2, E)
        h = self.act(gu[:, :, 0]) * gu[:, :, 1]
        if weights is not None:
            h = h * weights[..., None]
        return torch.bmm(h.view(T, 1, K * E), self.experts_down[idx].view(T, K * E, H)).view(T, H)

    def kernels(self, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
        """Each token's chosen experts through their own prepacked kernels (see pack): only those
        experts' weights are read, by the engine's fastest matmul, for decoding one sequence,
        where `masked` reads every expert and `gathered` copies the chosen ones first. Costs two
        kernel calls per (token, expert) pair."""
        rows = []
        for t, experts in enumerate(idx.tolist()):
            xt, y = x[t:t + 1], None
            for j, e in enumerate(experts):
                gate_up, down = self.expert_kernels[e]
                g, u = gate_up(xt).chunk(2, -1)
                h = self.act(g) * u
                if weights is not None:
                    h = h * weights[t, j]
                y = down(h) if y is None else y + down(h)
            rows.append(y)
        return torch.cat(rows) if len(rows) > 1 else rows[0]

    @property
    def grouped_fits(self) -> bool:
        """`F.grouped_mm` wants 16-byte aligned rows: E and H elements of the experts' dtype (the
        12-neuron experts of a 128-group split are 24 bytes in bf16: the server failed to start)."""
        size = self.experts_down.element_size()
        return self.expert_size * size % 16 == 0 and self.experts_down.shape[-1] * size % 16 == 0

    @property
    def sorted_path(self) -> str:
        """The path for pairs sorted by expert: `grouped`, or `looped` where grouped_mm cannot run."""
        return "grouped" if self.grouped_fits else "looped"

    @property
    def available_paths(self) -> tuple[str, ...]:
        return tuple(p for p in DISPATCH_PATHS
                     if (p != "kernels" or self.expert_kernels) and (p != "grouped" or self.grouped_fits)
                     and (p != "native" or self.native))

    def masked(self, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor | None,
               packed_out: torch.Tensor | None = None) -> torch.Tensor:
        """Run every expert on every token and zero the unchosen ones: the dense FFN's cost, for
        small batches whose tokens touch most experts anyway (decode), where it beats grouping.
        Also the training path (differentiable, gate weights included): one matmul pair beat the
        loop over experts in distillation at every configuration measured, 1.1-1.4x for the
        presets and 3-7x for 64-128 small experts (docs/results.md, session 11)."""
        T, (N, E, H) = x.shape[0], self.experts_down.shape
        if self.packed:  # all gates, then all ups (see pack); shared groups always on
            extra = self.packed[2]
            out = self.packed[0](x) if packed_out is None else packed_out
            g, u = out[:, :self.packed_expert_columns].view(T, 2, N + extra, E).unbind(1)
        else:
            extra = 0
            g, u = F.linear(x, self.gate_up().view(N * 2 * E, H)).view(T, N, 2, E).unbind(2)
        gate = g.new_zeros(T, N + extra)  # g's dtype: a wider gate would promote [T, N, E] (autocast)
        gate = gate.scatter_(1, idx, 1.0) if weights is None else gate.scatter_(1, idx, weights.to(g.dtype))
        if extra:
            gate[:, N:] = 1.0
        h = (self.act(g) * u * gate[..., None]).view(T, (N + extra) * E)
        return self.packed[1](h) if self.packed else h @ self.experts_down.view(N * E, H)

    @torch.no_grad()
    def tune_dispatch(self, max_tokens: int = 256, repeats: int = 5) -> list[tuple[int, str]]:
        """Time each dispatch path, routing included, at 1, 2, 4, ... tokens up to `max_tokens` (an
        engine's largest forward: its prefill chunk); remember the fastest per count.

        The paths run in turns, each timed call after an untimed one of the same path
        (`median_in_turns`), so that neither other work on the machine nor the path that ran
        before decides the choice. A path 3x slower than the best at one count is not
        timed at larger counts (the gathered path's cost grows fastest; above 256 tokens it is
        never timed: it would copy ~1 GB of expert weights per call). Layers that keep every
        expert are not timed (`keeps_every_expert`). Tuning up to the prefill chunk matters: on
        a CPU with AMX, prefill of 16 prompts ran 1.6-2.5x faster through `masked` than through
        `grouped`, the path counts above 256 used to get (docs/results.md, session 19)."""
        if self.keeps_every_expert:
            self.dispatch_plan = []
            return []
        p = self.experts_gate
        plan, paths = [], list(self.available_paths)
        for n in doubling_counts(max_tokens):
            if n > 256 and "gathered" in paths:
                paths.remove("gathered")
            x = torch.randn(n, p.shape[-1], dtype=p.dtype, device=p.device)
            best = median_in_turns({name: partial(self.routed, name, x) for name in paths}, repeats,
                                   sync=torch.cuda.synchronize if p.is_cuda else None)
            fastest = min(best, key=best.get)
            if fastest in ("grouped", "padded") and best.get("masked", float("inf")) < SKEW_MARGIN * best[fastest]:
                fastest = "masked"
            plan.append((n, fastest))
            paths = [name for name in paths if best[name] <= 3 * best[fastest]]
        self.dispatch_plan = plan
        self.reset_stats()
        return plan

    def extra_repr(self) -> str:
        shared = self.shared.gate_proj.out_features if self.shared is not None else 0
        return (f"experts={self.num_experts}, expert_size={self.expert_size}, top_k={self.top_k}, "
                f"shared={shared}, gate={self.gate}")
