"""lm-evaluation-harness for converted checkpoints: the registered model ``mixsga``.

``MixSGAHarnessLM`` is lm-eval's own ``HFLM`` (its request batching, tokenisation, few-shot and
metrics) around a model loaded by ``load_converted``, so loglikelihoods come from the converted
forward pass and ``generate_until`` runs through ``model.generate()`` with the mixSGA KV cache.

Routing (mixSGA only): ``auto`` (default, the paper's protocol) routes each scored sequence by
progressive top-k over its tokens and generated tokens by argmax; ``argmax`` routes every token
by its own router (causal, what streaming decoding sees). lm-eval right-pads loglikelihood
batches without an attention mask; top-k routing would count that padding as tokens, so
``auto`` needs ``batch_size=1`` (argmax routing is per token and batches freely).

Use::

    mixsga-evaluate RUN --harness hellaswag,arc_easy      # results in RUN/harness.json
    import lm_eval, mixsga_train.harness                  # registers the name "mixsga"
    lm_eval.simple_evaluate(model="mixsga", model_args="pretrained=RUN/model,routing=argmax", batch_size=8,
                            tasks=["hellaswag"])
"""

from __future__ import annotations

from pathlib import Path

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from .attention import load_converted, routing_context
from .attention.persistence import load_tokenizer

HARNESS_ROUTINGS = ("auto", "argmax")
# The paper's Table 2 zero-shot tasks, by their lm-eval names (need the Hub for the data).
PAPER_TASKS = ("arc_easy", "arc_challenge", "hellaswag", "piqa", "winogrande", "openbookqa", "boolq")


@register_model("mixsga")
class MixSGAHarnessLM(HFLM):
    """``pretrained``: a checkpoint folder saved by mixsga-train (or a loaded converted model, then
    pass ``tokenizer``). ``routing``: ``auto`` or ``argmax`` (module docstring). ``device`` and
    ``dtype`` (e.g. ``bfloat16``) apply to a folder (default: CUDA when available, the saved dtype).
    Other keyword arguments go to ``HFLM`` (``max_length``, ``add_bos_token``, ...)."""

    def __init__(self, pretrained, routing: str = "auto", batch_size: int | str = 1, tokenizer=None,
                 device: str | None = None, dtype: str | torch.dtype | None = None, **kwargs):
        if routing not in HARNESS_ROUTINGS:
            raise ValueError(f"routing={routing!r}: choose one of {', '.join(HARNESS_ROUTINGS)}")
        if routing == "auto" and int(batch_size) != 1:
            raise ValueError(
                f"batch_size={batch_size} with routing=auto: lm-eval's right padding would enter top-k routing; "
                "use batch_size=1 or routing=argmax"
            )
        if isinstance(pretrained, (str, Path)):
            tokenizer = tokenizer or load_tokenizer(pretrained)
            if isinstance(dtype, str):
                dtype = None if dtype == "auto" else getattr(torch, dtype)
            pretrained = load_converted(pretrained, dtype=dtype)
            pretrained.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if tokenizer is None:
            raise ValueError("a loaded model needs its tokenizer: pass tokenizer=...")
        if getattr(pretrained, "_mixsga_resolved", None) is not None:
            routing_context(pretrained).mode = routing
        super().__init__(pretrained=pretrained.eval(), tokenizer=tokenizer, batch_size=int(batch_size), **kwargs)


def run_harness(checkpoint: Path, tasks: list[str], include_path: Path | None = None, limit: int | None = None,
                num_fewshot: int | None = None, routing: str = "auto", batch_size: int = 1,
                log_samples: bool = False) -> dict:
    """lm-eval's ``simple_evaluate`` of the checkpoint on ``tasks`` (lm-eval task names, or tasks
    defined by YAML files under ``include_path``); returns lm-eval's results dict."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(include_path) if include_path is not None else None)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ValueError(
            f"--harness: unknown lm-eval task(s) {', '.join(unknown)}; check the names (lm_eval ls tasks) "
            "or pass --harness-include DIR with their YAML files"
        )
    lm = MixSGAHarnessLM(str(checkpoint), routing=routing, batch_size=batch_size)
    return simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit, num_fewshot=num_fewshot,
                           log_samples=log_samples)
