"""The interface every attention method implements, and the typed per-layer cache layouts.

An attention method is a dataclass subclass of ``ResolvedAttention``: its fields are the method's
configuration checked against one model (every number final, saved with converted models), and
its methods are what the rest of the package asks of it:

* ``resolve(cfg, native_kv_heads, num_layers)`` (classmethod): validate an ``AttentionConfig``
  against the model's shape; every failure is a one-line ``ConfigError`` naming the key.
* ``describe()``: one line for logs (built from ``detail()``).
* ``convert_layer(attn, layer_idx, target)``: replace one attention module's K/V projections and
  return the ``LayerLayout`` its cache layer needs; the layout builds that cache layer.
* ``kv_budget`` (a field): the fraction of the native KV cache the method keeps (``budget.py``).

Methods are found by name in ``ATTENTION_METHODS`` (``methods/__init__.py``); a new method is one
module with a ``@register_attention_method`` class (see docs/architecture.md).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, ClassVar

from torch import nn
from transformers.cache_utils import CacheLayerMixin, DynamicLayer

from ...errors import ConfigError
from ..cache import MixedKVLayer, SharedKVLayer
from ..heads import HeadGrouping
from ..routing import RoutingContext, TokenRouter

if TYPE_CHECKING:
    from ..config import AttentionConfig
    from ..decode_kernel import DecodeKernelSwitch
    from ..segment_attention import SegmentReadSwitch

DECODE_KERNELS = ("torch", "triton")


@dataclass(frozen=True)
class CacheSwitches:
    """Per-model inference switches handed to every mixed cache layer (None where not enabled)."""

    decode: DecodeKernelSwitch | None = None
    read: SegmentReadSwitch | None = None


class LayerLayout(ABC):
    """What one converted layer's cache holds; ``cache_layer`` builds it for a fresh cache."""

    @abstractmethod
    def cache_layer(self, earlier: list[CacheLayerMixin], switches: CacheSwitches) -> CacheLayerMixin:
        """The cache layer of this layer; ``earlier`` holds the layers already built (index < this one)."""


@dataclass(frozen=True)
class NativeLayout(LayerLayout):
    """The layer is unchanged: transformers' own ``DynamicLayer``."""

    def cache_layer(self, earlier, switches):
        return DynamicLayer()


@dataclass(frozen=True, eq=False)
class MixedLayout(LayerLayout):
    """K/V stored per expert at ``groupings[e].kv_heads`` heads; ``router`` picks each token's expert
    (None: every token goes to expert 0, e.g. GQA's single grouping)."""

    groupings: list[HeadGrouping]
    router: TokenRouter | None = None

    def cache_layer(self, earlier, switches):
        return MixedKVLayer(self.groupings, self.router, switches.decode, switches.read)


@dataclass(frozen=True)
class SharedLayout(LayerLayout):
    """The layer stores nothing and reads the K/V of layer ``owner`` (CLA)."""

    owner: int

    def cache_layer(self, earlier, switches):
        return SharedKVLayer(earlier[self.owner])


@dataclass(frozen=True, eq=False)
class ConversionTarget:
    """What ``convert_layer`` may need of the whole model: every attention module (CLA borrows
    another layer's projections), the head dimension, the hidden size and the shared routing state."""

    attentions: list[nn.Module]
    head_dim: int
    hidden_size: int
    context: RoutingContext


@dataclass(kw_only=True)
class ResolvedAttention(ABC):
    """An ``AttentionConfig`` checked against a model: the method's typed fields, every number final.

    native_kv_heads / num_layers: the model's shape; kv_budget: fraction of the native KV cache kept;
    decode_kernel: ``torch`` or ``triton`` (inference only, see ``decode_kernel.py``).
    """

    method: ClassVar[str]
    decode_kernel_ready: ClassVar[bool] = False  # the fused decode kernel can serve this method's cache

    native_kv_heads: int
    num_layers: int
    kv_budget: float
    decode_kernel: str = "torch"

    def __post_init__(self):
        if self.decode_kernel not in DECODE_KERNELS:
            raise ConfigError(
                "attention.decode_kernel", f"unknown {self.decode_kernel!r}; choose one of {', '.join(DECODE_KERNELS)}"
            )

    @classmethod
    @abstractmethod
    def resolve(cls, cfg: AttentionConfig, native_kv_heads: int, num_layers: int) -> ResolvedAttention:
        """Validate ``cfg`` against the model's shape (one-line ConfigErrors) and build the resolved method."""

    @abstractmethod
    def detail(self) -> str:
        """The method-specific part of ``describe()``, e.g. ``2 mean-pooled KV heads``."""

    @abstractmethod
    def convert_layer(self, attn: nn.Module, layer_idx: int, target: ConversionTarget) -> LayerLayout:
        """Replace ``attn``'s K/V projections in place; return the layout its cache layer needs."""

    def describe(self) -> str:
        """One line for logs, e.g. ``mixsga 3:1:6 over KV heads [8, 4, 2]: 50.0% of native KV``."""
        return f"{self.method} {self.detail()}: {100 * self.kv_budget:.1f}% of native KV"

    def routing_context(self) -> RoutingContext:
        """The routing state the converted model's forward hooks and routers share."""
        return RoutingContext()

    @property
    def num_experts(self) -> int:
        """Routed experts per layer (0 for methods without a router)."""
        return 0

    @property
    def aux_weight(self) -> float:
        """alpha of eq. 5: weight of the routers' consistency loss in the training loss (0: none)."""
        return 0.0

    @property
    def segment_kv_heads(self) -> list[int] | None:
        """KV heads of each cache segment (mixSGA's experts, GQA's one group; None: native layout)."""
        return None

    def summary_fields(self) -> dict:
        """The method's fields in a run's metrics.json (None where they do not apply)."""
        return {
            "expert_kv_heads": self.segment_kv_heads,
            "ratio": None,
            "router_grad": None,
            "router": None,
            "alpha": None,
        }

    def weights_key(self) -> tuple:
        """What fixes the converted weights' shapes and meaning (a checkpoint must match it)."""
        return (self.method, round(self.kv_budget, 6))

    def to_dict(self) -> dict:
        """The JSON-able form saved under ``config.json``'s ``mixsga`` key (``from_saved`` reads it back)."""
        return {"method": self.method, **asdict(self)}

    @classmethod
    def from_saved(cls, stored: dict) -> ResolvedAttention:
        """Rebuild from ``to_dict()`` output, ignoring keys of other methods (checkpoints written
        before the registry stored every method's keys in one flat dict)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in stored.items() if k in names})
