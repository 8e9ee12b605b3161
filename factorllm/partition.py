"""Grouping FFN neurons into equal-sized experts by co-activation (MoEfication / CMoE style)."""
from __future__ import annotations

import torch


def neuron_importance(acts: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """Mean magnitude each neuron adds to the FFN output: mean|a_j| * ||down[:, j]||."""
    return acts.abs().mean(0) * down.norm(dim=0)


def balanced_assign(dist: torch.Tensor, size: int) -> torch.Tensor:
    """Assign each point to a cluster with at most `size` points, greedily by distance.

    dist: [P, C] with P = C * size. Pairs are visited from the closest up; a point takes the
    first cluster that still has room. Returns the cluster of each point, [P]."""
    P, C = dist.shape
    order = dist.flatten().argsort().tolist()
    cluster = [-1] * P
    room = [size] * C
    left = P
    for flat in order:
        p, c = divmod(flat, C)
        if cluster[p] < 0 and room[c]:
            cluster[p] = c
            room[c] -= 1
            left -= 1
            if not left:
                break
    return torch.tensor(cluster)


def balanced_clusters(features: torch.Tensor, num_clusters: int, iters: int = 15, seed: int = 0) -> torch.Tensor:
    """Balanced spherical k-means of points `features` [P, D] into equal groups.

    Returns a [num_clusters, P / num_clusters] table of point indices (each point exactly once)."""
    P = features.shape[0]
    size = P // num_clusters
    f = features.float().cpu()  # the greedy assignment runs on the CPU anyway
    f = f / f.norm(dim=1, keepdim=True).clamp_min(1e-8)
    gen = torch.Generator().manual_seed(seed)
    centroids = f[torch.randperm(P, generator=gen)[:num_clusters]]
    assign = None
    for _ in range(iters):
        new = balanced_assign(1 - f @ centroids.T, size)
        if assign is not None and torch.equal(new, assign):
            break
        assign = new
        for c in range(num_clusters):
            m = f[assign == c].mean(0)
            centroids[c] = m / m.norm().clamp_min(1e-8)
    return torch.stack([torch.nonzero(assign == c).flatten() for c in range(num_clusters)])
