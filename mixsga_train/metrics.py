"""The metrics contract: what a run reports, as typed dataclasses serialised to ``metrics.json``
(documented key by key in docs/metrics.md).

Producers build these objects (``evaluation/suite.py`` the ``eval`` blocks, ``pipeline.py`` the
run), consumers read them (``train.py``'s summary, ``mixsga-evaluate``, W&B in ``tracking.py``,
``experiments/reportlib``). ``to_json`` writes the JSON keys; ``from_json`` reads a file back and
treats keys that an older file lacks as null, so older run directories still report.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass
class ExpertFractions:
    """Share of tokens routed to each expert (mixSGA; all null for models without routers).

    prefill: top-k routing over the evaluated blocks or prompts; decode: realised during greedy
    ``generate()`` (causal routing, real tokens only); causal: causal routing over the blocks."""

    prefill: list[float] | None = None
    decode: list[float] | None = None
    causal: list[float] | None = None

    @classmethod
    def from_json(cls, data: dict | None) -> ExpertFractions:
        data = data or {}
        return cls(data.get("prefill"), data.get("decode"), data.get("causal"))


@dataclass
class EvalMetrics:
    """One evaluation of a model (the ``eval`` and ``eval_before`` blocks, and ``mixsga-evaluate``'s).

    ppl / word_ppl: top-k routing over each block (the paper's protocol); ``*_causal_routing``:
    causal argmax routing (what decoding sees). word perplexities are null for SFT tasks.
    eval_tokens: tokens scored. kv_bytes_per_token: KV bytes per real token at prefill;
    kv_bytes_per_token_decode / kv_share_decode: per real generated token, absolute and as a share
    of the native cache (expert ids included); decode_tokens: how many generated tokens that
    measured. Both KV values are null when nothing was generated (e.g. ``task.eval_sets=[]``).
    kv_share_causal: the KV share (of native, id bytes included) that the causal-routing perplexity
    spent (``routed_kv_share``; the static budget for GQA/CLA), where its headline is placed.
    routing_agreement: share of tokens where argmax routing agrees with top-k (null without
    routers). rouge_l: ROUGE-L F x 100 per eval set (empty for LM tasks)."""

    ppl_causal_routing: float | None = None
    ppl: float | None = None
    word_ppl_causal_routing: float | None = None
    word_ppl: float | None = None
    eval_tokens: int | None = None
    kv_bytes_per_token: float | None = None
    kv_bytes_per_token_decode: float | None = None
    kv_share_decode: float | None = None
    kv_share_causal: float | None = None
    decode_tokens: int | None = None
    expert_fractions: ExpertFractions = field(default_factory=ExpertFractions)
    routing_agreement: float | None = None
    rouge_l: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict | None) -> EvalMetrics | None:
        if data is None:
            return None
        scalars = {k: data.get(k) for k in _SCALAR_EVAL_KEYS}
        return cls(
            **scalars,
            expert_fractions=ExpertFractions.from_json(data.get("expert_fractions")),
            rouge_l=dict(data.get("rouge_l") or {}),
        )

    def curves(self, prefix: str) -> dict[str, float]:
        """The numbers tracked as curves: ``{prefix}/{key}`` for every number set, ROUGE-L per set."""
        numbers = {f"{prefix}/{k}": v for k, v in asdict(self).items() if _number(v)}
        numbers.update({f"{prefix}/rouge_l/{name}": value for name, value in self.rouge_l.items()})
        return numbers


_SCALAR_EVAL_KEYS = (
    "ppl_causal_routing",
    "ppl",
    "word_ppl_causal_routing",
    "word_ppl",
    "eval_tokens",
    "kv_bytes_per_token",
    "kv_bytes_per_token_decode",
    "kv_share_decode",
    "kv_share_causal",
    "decode_tokens",
    "routing_agreement",
)


@dataclass
class TrainRouting:
    """mixSGA's routing during training, over all ranks and steps: the share of training tokens per
    expert, the share of top-k decisions argmax routing would have matched, and the relative L2
    change of the router weights from conversion to the end."""

    expert_fractions: list[float]
    routing_agreement: float | None = None
    router_weight_change: float | None = None

    @classmethod
    def from_json(cls, data: dict | None) -> TrainRouting | None:
        if data is None:
            return None
        return cls(data.get("expert_fractions") or [], data.get("routing_agreement"), data.get("router_weight_change"))


@dataclass
class TrainMetrics:
    """What training did (the ``train`` block): optimizer steps, tokens (all ranks), wall-clock
    seconds and throughput (not deterministic), the last step's loss with and without the aux
    term, the per-step loss curve, routing statistics (mixSGA) and the step a resume started from."""

    steps: int
    tokens: int
    seconds: float
    tokens_per_s: float
    final_loss: float | None = None
    final_lm_loss: float | None = None
    losses: list[float] = field(default_factory=list)
    routing: TrainRouting | None = None
    resumed_from: int | None = None

    @classmethod
    def from_json(cls, data: dict | None) -> TrainMetrics | None:
        if data is None:
            return None
        return cls(
            data.get("steps", 0),
            data.get("tokens", 0),
            data.get("seconds", 0.0),
            data.get("tokens_per_s", 0.0),
            data.get("final_loss"),
            data.get("final_lm_loss"),
            list(data.get("losses") or []),
            TrainRouting.from_json(data.get("routing")),
            data.get("resumed_from"),
        )


@dataclass
class RunMetrics:
    """A finished run (``metrics.json``): what ran (model, task, experiment, seed, the resolved
    attention and its headline fields), the measured KV bytes per token against the native
    cache's, the parameter count, and the train / eval_before / eval blocks."""

    model: str
    task: str
    experiment: str
    seed: int
    method: str
    expert_kv_heads: list[int] | None
    ratio: list[float] | None
    router_grad: str | None
    router: str | None
    alpha: float | None
    kv_budget: float
    kv_bytes_per_token: float | None
    kv_bytes_per_token_native: int | None
    params: int | None
    attention: dict
    train: TrainMetrics | None
    eval_before: EvalMetrics | None
    eval: EvalMetrics

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> RunMetrics:
        """Read a metrics.json object; keys an older file lacks are null (a missing ``eval`` is empty)."""
        if not isinstance(data, dict):
            raise TypeError(f"metrics.json holds {type(data).__name__}, not an object")
        top = {k: data.get(k) for k in _TOP_KEYS}
        return cls(
            **top,
            attention=dict(data.get("attention") or {}),
            train=TrainMetrics.from_json(data.get("train")),
            eval_before=EvalMetrics.from_json(data.get("eval_before")),
            eval=EvalMetrics.from_json(data.get("eval") or {}),
        )


_TOP_KEYS = (
    "model",
    "task",
    "experiment",
    "seed",
    "method",
    "expert_kv_heads",
    "ratio",
    "router_grad",
    "router",
    "alpha",
    "kv_budget",
    "kv_bytes_per_token",
    "kv_bytes_per_token_native",
    "params",
)
