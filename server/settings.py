"""Every `factorllm serve` setting, also settable by environment (`FACTORLLM_<NAME>`).

Precedence: command-line flag > environment variable > default. Docker and Kubernetes set the
environment (e.g. `FACTORLLM_DEVICE=cuda`, `FACTORLLM_SHUTDOWN_TIMEOUT=50`).
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

EXPERT_METRICS = ("per-expert", "per-layer", "off")


class ServerSettings(BaseSettings):
    # Empty variables count as unset (compose passes `FACTORLLM_PRESET=` through when the host has none).
    model_config = SettingsConfigDict(env_prefix="FACTORLLM_", extra="ignore", protected_namespaces=(),
                                      env_ignore_empty=True)

    # what to serve
    model: str = Field("default", description="model source: 'default', a .gguf file, a HF directory or a factorized checkpoint")
    dense: bool = Field(False, description="serve the unfactorized model (A/B comparison)")
    preset: Literal["quality", "fast"] | None = Field(None, description="factorization preset (default: quality)")
    experts: int | None = None
    top_k: int | None = None
    top_k_per_layer: list[int] | None = None
    dense_layers: int | None = None
    shared_experts: int | None = None
    partition: Literal["contiguous", "cluster"] | None = None
    gate: Literal["sum", "scaled", "weighted"] | None = None
    router_init: Literal["random", "centroid", "lstsq"] | None = None
    seed: int | None = None
    calib: str | None = None
    calib_seqs: int | None = None
    served_model_name: str | None = None

    # where
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)

    # engine
    device: Literal["auto", "cuda", "cpu"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    quantize: Literal["auto", "none", "int8"] = Field(
        "auto", description="int8: int8 weight-only linears (CPU); auto: int8 on CPUs without native bf16 when dtype is auto")
    max_num_seqs: int = Field(16, ge=1)
    max_model_len: int = Field(2048, ge=16)
    max_num_batched_tokens: int = Field(2048, ge=16)
    prefix_caching: Literal["on", "off"] = Field(
        "on", description="free cache slots keep their keys/values for later prompts that share a prefix")

    # limits and behaviour
    max_queued_requests: int = Field(64, ge=0, description="waiting sequences beyond max_num_seqs before 429")
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024)
    api_key: SecretStr | None = None
    cors_origins: list[str] = Field(default_factory=list, description="origins allowed to call the API from a browser (CORS off when empty)")
    shutdown_timeout: float = Field(30.0, ge=0)
    expert_metrics: Literal["per-expert", "per-layer", "off"] = "per-expert"
    expert_timing_every: int = Field(16, ge=1, description="time experts every Nth decode-only step (the C kernel times its own experts; elsewhere timed steps run the looped dispatch)")

    @field_validator("api_key", mode="before")
    @classmethod
    def _empty_key_is_none(cls, v):
        return None if v in ("", None) else v

    def factor_overrides(self) -> dict:
        return dict(experts=self.experts, top_k=self.top_k, shared_experts=self.shared_experts,
                    partition=self.partition, gate=self.gate, router_init=self.router_init, seed=self.seed,
                    top_k_per_layer=self.top_k_per_layer, dense_layers=self.dense_layers,
                    calib_seqs=self.calib_seqs)

    def has_factor_flags(self) -> bool:
        return self.preset is not None or any(v is not None for v in self.factor_overrides().values())
