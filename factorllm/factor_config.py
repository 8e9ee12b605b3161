"""How a model was factorized: the `factorllm` section of a factorized checkpoint's config.json."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from .errors import UsageError

# Bumped whenever the tensor layout of a factorized checkpoint changes (2: experts_down [N, E, H]).
CHECKPOINT_FORMAT = 2
PARTITIONS = ("contiguous", "cluster")
ROUTER_INITS = ("random", "centroid", "lstsq")
ROUTER_LABELS = ("paper", "greedy", "mass")

# Recommended configurations (see docs/results.md): ~50% and ~25% of the FFN active.
PRESETS = {
    "quality": dict(experts=14, shared_experts=2, top_k=6, partition="cluster", router_init="lstsq",
                    router_label="greedy", refit=True),
    "fast": dict(experts=28, shared_experts=4, top_k=4, partition="cluster", router_init="lstsq",
                 router_label="greedy", refit=True),
}


@dataclass
class FactorConfig:
    """N routed experts of `expert_size` neurons (top_k chosen per token) plus S always-on
    shared groups of the same size: intermediate = (experts + shared_experts) * expert_size."""

    experts: int
    top_k: int
    partition: str = "cluster"
    shared_experts: int = 0
    gate: str = "sum"
    router_init: str = "lstsq"
    router_label: str | None = None  # PAR router training on this pseudo-label (router_training.py)
    router_steps: int = 100
    refit: bool = False              # closed-form refit of the down projections (distill.refit_down)
    base: str = "default"
    calib: str = "self-generated"
    seed: int = 0
    intermediate_size: int = 0
    top_k_per_layer: list[int] | None = None
    trained: dict = field(default_factory=dict)  # what training steps ran, for provenance
    name: str | None = None

    @property
    def expert_size(self) -> int:
        return self.intermediate_size // (self.experts + self.shared_experts)

    @property
    def needs_calibration(self) -> bool:
        return (self.partition != "contiguous" or self.router_init != "random" or self.router_label is not None
                or self.refit)

    def layer_top_k(self, layer: int) -> int:
        return self.top_k_per_layer[layer] if self.top_k_per_layer else self.top_k

    def active_ffn_fraction(self, num_layers: int) -> float:
        ks = [self.layer_top_k(i) for i in range(num_layers)]
        per_layer = [(k + self.shared_experts) / (self.experts + self.shared_experts) for k in ks]
        return sum(per_layer) / num_layers

    def validate(self, intermediate_size: int) -> "FactorConfig":
        groups = self.experts + self.shared_experts
        if self.experts < 1 or self.shared_experts < 0:
            raise UsageError(f"--experts must be >= 1 and --shared-experts >= 0 (got {self.experts}, {self.shared_experts})")
        if intermediate_size % groups:
            allowed = [n - self.shared_experts for n in range(1, intermediate_size + 1)
                       if intermediate_size % n == 0 and n - self.shared_experts >= 1]
            raise UsageError(
                f"experts + shared experts ({groups}) must divide the FFN size {intermediate_size}; "
                f"with {self.shared_experts} shared, allowed --experts: {', '.join(map(str, allowed[:24]))}")
        for k in ([self.top_k] + list(self.top_k_per_layer or [])):
            if not 1 <= k <= self.experts:
                raise UsageError(f"--top-k must satisfy 1 <= K <= N = {self.experts}, got {k}")
        if self.partition not in PARTITIONS:
            raise UsageError(f"--partition must be one of {', '.join(PARTITIONS)}")
        if self.router_init not in ROUTER_INITS:
            raise UsageError(f"--router-init must be one of {', '.join(ROUTER_INITS)}")
        if self.router_label is not None and self.router_label not in ROUTER_LABELS:
            raise UsageError(f"--router-label must be one of {', '.join(ROUTER_LABELS)}")
        self.intermediate_size = intermediate_size
        return self

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "FactorConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})
