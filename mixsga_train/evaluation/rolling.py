"""Rolling-window perplexity (``task.stride`` < ``task.seq_len``), the way lm-evaluation-harness
scores ``loglikelihood_rolling``: every token of the text after the first is predicted exactly once,
the first window with the tokens before it, each later window scoring ``stride`` new tokens with
``seq_len - stride`` tokens of context before them (lm-eval's ``get_rolling_token_windows``)."""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from .perplexity import PerplexityResult, evaluate_response_perplexity


def rolling_windows(ids: torch.Tensor, seq_len: int, stride: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Windows over the token stream ``ids`` [T] (T >= seq_len): (input_ids [N, seq_len], labels
    [N, seq_len]) with labels -100 where a token is context only. Token 0 is the first window's
    first input (never a target); tokens 1..T-1 are targets exactly once. 1 <= stride < seq_len."""
    from lm_eval.utils import get_rolling_token_windows

    if not 1 <= stride < seq_len <= ids.numel():
        raise ValueError(
            f"need 1 <= stride < seq_len <= tokens, got stride={stride}, seq_len={seq_len}, {ids.numel()} tokens"
        )
    tokens = ids.tolist()
    windows, labels = [], []
    # lm-eval predicts len(token_list) tokens from max_seq_len inputs; a window here holds both (+1).
    for inputs, targets in get_rolling_token_windows(tokens[1:], tokens[0], max_seq_len=seq_len - 1,
                                                     context_len=seq_len - stride):
        window = inputs + targets[-1:]
        windows.append(window)
        labels.append([-100] * (len(window) - len(targets)) + targets)
    return torch.tensor(windows), torch.tensor(labels)


@torch.no_grad()
def evaluate_rolling_perplexity(model: nn.Module, windows: torch.Tensor, labels: torch.Tensor, batch_size: int,
                                routing: str = "topk", words: int | None = None) -> PerplexityResult:
    """Perplexity over the labelled tokens of ``rolling_windows`` (token- and, given ``words``,
    word-level), under ``routing``."""
    batches = [{"input_ids": windows[i:i + batch_size], "labels": labels[i:i + batch_size]}
               for i in range(0, windows.shape[0], batch_size)]
    result = evaluate_response_perplexity(model, batches, routing)
    if words is None:
        return result
    try:
        word_ppl = math.exp(result.nll_sum / words)
    except OverflowError:
        word_ppl = math.inf
    return dataclasses.replace(result, word_ppl=word_ppl)
