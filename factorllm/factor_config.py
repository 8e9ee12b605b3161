"""How a model was factorized: the `factorllm` section of a factorized checkpoint's config.json."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace

from .errors import UsageError

# Bumped whenever the tensor layout of a factorized checkpoint changes (2: experts_down [N, E, H]).
CHECKPOINT_FORMAT = 2
PARTITIONS = ("contiguous", "cluster")
ROUTER_INITS = ("random", "centroid", "lstsq")
ROUTER_LABELS = ("paper", "greedy", "mass")

# Recommended configurations (see docs/results.md): ~50% and ~25% of the FFN active. A large
# always-on share with few routed experts and a dense first layer measured best at both fractions.
# calib_seqs: as many self-generated windows as fit a ~2-minute CPU build (more text, better
# refits: docs/results.md, session 8); `fast` has 26 experts to evaluate per token, so fewer.
PRESETS = {
    "quality": dict(experts=10, shared_experts=6, top_k=2, dense_layers=1, partition="cluster",
                    router_init="lstsq", router_label="greedy", refit=True, calib_seqs=32),
    "fast": dict(experts=26, shared_experts=6, top_k=2, dense_layers=1, partition="cluster",
                 router_init="lstsq", router_label="greedy", refit=True, calib_seqs=24),
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
    refit_ridge: float = 1.0         # its pull toward the original weights (docs/results.md, session 7)
    sequential: bool = True          # fit each layer on the inputs the factorized layers below it produce
    base: str = "default"
    calib: str = "self-generated"
    seed: int = 0
    calib_seqs: int = 16             # calibration windows of 256 tokens (more: better fits, slower build)
    intermediate_size: int = 0
    top_k_per_layer: list[int] | None = None
    dense_layers: int = 0            # the first D layers keep every expert (see resolve_layer_top_k)
    trained: dict = field(default_factory=dict)  # what training steps ran, for provenance
    name: str | None = None

    @property
    def expert_size(self) -> int:
        return self.intermediate_size // (self.experts + self.shared_experts)

    @property
    def needs_calibration(self) -> bool:
        return (self.partition != "contiguous" or self.router_init != "random" or self.router_label is not None
                or self.refit)

    def resolve_layer_top_k(self, num_layers: int) -> "FactorConfig":
        """Turn `dense_layers` into `top_k_per_layer`: the first D layers keep all N experts and
        the layers nearest the middle of the rest give up one expert at a time until the mean K
        (and so the active fraction) is `top_k` again. Measured on the default model: the first
        FFN is by far the most sensitive to splitting, the middle ones the least."""
        if self.top_k_per_layer is not None:
            if len(self.top_k_per_layer) != num_layers:
                raise UsageError(f"--top-k-per-layer needs {num_layers} values (one per layer), "
                                 f"got {len(self.top_k_per_layer)}")
            return self
        if not self.dense_layers:
            return self
        D, K, N = self.dense_layers, self.top_k, self.experts
        if not 0 < D < num_layers:
            raise UsageError(f"--dense-layers must be between 0 and {num_layers - 1}, got {D}")
        excess = D * (N - K)
        if excess > (num_layers - D) * (K - 1):
            raise UsageError(f"cannot keep {D} dense layer(s) at a mean top-k of {K}: the other layers "
                             "would fall below top-1; raise --top-k or lower --dense-layers")
        ks = [N] * D + [K] * (num_layers - D)
        middle = (D + num_layers - 1) / 2
        donors = sorted(range(D, num_layers), key=lambda l: (abs(l - middle), l))
        while excess:  # round after round, middle-out, one expert per donor per round
            for l in donors:
                if excess and ks[l] > 1:
                    ks[l] -= 1
                    excess -= 1
        self.top_k_per_layer = ks
        return self

    def rerouted(self, top_k: int | None, top_k_per_layer: list[int] | None, num_layers: int) -> "FactorConfig":
        """This recipe routing to another number of experts per token: `top_k` as the new mean,
        spread over the layers as at build time (resolve_layer_top_k), or `top_k_per_layer`."""
        mean_k = top_k if top_k is not None else round(sum(top_k_per_layer) / len(top_k_per_layer))
        new = replace(self, top_k=mean_k, top_k_per_layer=top_k_per_layer,
                      trained=dict(self.trained, rerouted_from=self.top_k_per_layer or self.top_k))
        return new.validate(self.intermediate_size, num_layers)

    def layer_top_k(self, layer: int) -> int:
        return self.top_k_per_layer[layer] if self.top_k_per_layer else self.top_k

    def active_ffn_fraction(self, num_layers: int) -> float:
        ks = [self.layer_top_k(i) for i in range(num_layers)]
        per_layer = [(k + self.shared_experts) / (self.experts + self.shared_experts) for k in ks]
        return sum(per_layer) / num_layers

    def validate(self, intermediate_size: int, num_layers: int | None = None) -> "FactorConfig":
        """Check the recipe against the model's FFN size; with `num_layers`, also settle the
        per-layer K (resolve_layer_top_k)."""
        groups = self.experts + self.shared_experts
        if self.calib_seqs < 1:
            raise UsageError(f"--calib-seqs must be >= 1, got {self.calib_seqs}")
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
        return self if num_layers is None else self.resolve_layer_top_k(num_layers)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "FactorConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})
