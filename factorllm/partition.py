"""Grouping FFN neurons into equal-sized experts by co-activation (MoEfication / CMoE style)."""
from __future__ import annotations

import torch


def neuron_importance(acts: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """Mean magnitude each neuron adds to the FFN output: mean|a_j| * ||down[:, j]||."""
    return acts.abs().mean(0) * down.norm(dim=0)


def balanced_assign(dist: torch.Tensor, size: int) -> torch.Tensor:
    """Assign each point to a cluster with at most `size` points, nearest first.

    dist: [P, C] with P = C * size. In rounds: every unassigned point proposes to its nearest
    cluster that still has room, and each cluster accepts its nearest proposers up to its room
    (vectorized; a pair-by-pair greedy in Python cost ~40 ms per call, 15 calls per layer).
    Returns the cluster of each point, [P]."""
    P, C = dist.shape
    dev = dist.device
    cluster = torch.full((P,), -1, dtype=torch.long, device=dev)
    room = torch.full((C,), size, dtype=torch.long, device=dev)
    free = torch.arange(P, device=dev)
    while free.numel():
        d = dist[free].masked_fill(room[None, :] == 0, float("inf"))
        best_d, best = d.min(1)
        order = best_d.argsort()
        order = order[best[order].argsort(stable=True)]  # grouped by cluster, nearest first in each
        target = best[order]
        counts = torch.bincount(target, minlength=C)
        rank = torch.arange(order.numel(), device=dev) - (counts.cumsum(0) - counts)[target]
        take = rank < room[target]
        cluster[free[order[take]]] = target[take]
        room -= torch.bincount(target[take], minlength=C)
        free = free[cluster[free] < 0]
    return cluster


def balanced_clusters(features: torch.Tensor, num_clusters: int, iters: int = 15, seed: int = 0) -> torch.Tensor:
    """Balanced spherical k-means of points `features` [P, D] into equal groups.

    Returns a [num_clusters, P / num_clusters] table of point indices (each point exactly once)."""
    P = features.shape[0]
    size = P // num_clusters
    f = features.float()
    f = (f / f.norm(dim=1, keepdim=True).clamp_min(1e-8)).contiguous()  # rows are read 2x per iteration
    gen = torch.Generator().manual_seed(seed)
    centroids = f[torch.randperm(P, generator=gen)[:num_clusters]]
    assign = None
    for _ in range(iters):
        new = balanced_assign(1 - f @ centroids.T, size)
        if assign is not None and torch.equal(new, assign):
            break
        assign = new
        # every cluster has `size` points: the normalized sum is the spherical mean
        sums = torch.zeros_like(centroids).index_add_(0, assign, f)
        centroids = sums / sums.norm(dim=1, keepdim=True).clamp_min(1e-8)
    return assign.argsort(stable=True).view(num_clusters, size)  # each cluster's points, ascending
