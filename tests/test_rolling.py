"""task.stride: rolling-window perplexity (lm-eval's windows), checked token by token against a causal model."""

import math

import pytest
import torch
import torch.nn.functional as F

from mixsga_train.attention import AttentionConfig, convert_model
from mixsga_train.config import RunConfig
from mixsga_train.data.config import TaskConfig
from mixsga_train.evaluation.rolling import evaluate_rolling_perplexity, rolling_windows
from mixsga_train.evaluation.suite import evaluate_lm
from mixsga_train.models.tiny import tiny_tokenizer
from tiny import tiny_model

IDS = torch.randint(0, 96, (23,), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("seq_len, stride", [(8, 1), (8, 3), (8, 7), (5, 2)])
def test_every_token_after_the_first_is_a_target_once(seq_len, stride):
    windows, labels = rolling_windows(IDS, seq_len, stride)
    assert windows.shape == labels.shape and windows.shape[1] == seq_len
    targets = labels != -100
    assert targets[0, 1:].all() and not targets[0, 0]  # the first window scores all it can
    assert (targets[1:].sum(1) <= stride).all()
    assert torch.equal(labels[targets], windows[targets])
    assert torch.equal(labels[targets], IDS[1:])  # in order, each once
    for row in targets[1:]:  # later windows: at least seq_len - stride tokens of context
        assert (~row).sum() >= seq_len - stride


def test_stride_one_gives_each_token_its_full_context():
    model = tiny_model("llama", layers=2)
    seq_len = 6
    windows, labels = rolling_windows(IDS, seq_len, 1)
    result = evaluate_rolling_perplexity(model, windows, labels, batch_size=4, words=7)
    nll = 0.0
    with torch.no_grad():
        for t in range(1, IDS.numel()):
            context = IDS[max(0, t - (seq_len - 1)):t]
            logits = model(context[None]).logits[0, -1]
            nll += F.cross_entropy(logits[None], IDS[t:t + 1]).item()
    assert result.tokens == IDS.numel() - 1
    assert result.nll_sum == pytest.approx(nll, rel=1e-5)
    assert result.word_ppl == pytest.approx(math.exp(nll / 7), rel=1e-5)


def test_task_stride_switches_the_run_to_rolling_windows(tmp_path):
    from mixsga_train.pipeline import load_task_data

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "valid.txt").write_text("some valid words " * 10)
    (corpus / "test.txt").write_text("the held out test text, forty bytes long")
    tokenizer = tiny_tokenizer()
    model = tiny_model("llama", layers=2)
    model.resize_token_embeddings(len(tokenizer))
    convert_model(model, AttentionConfig(method="mixsga", ratio="1:1:2"))
    blocks = load_task_data(RunConfig(task=TaskConfig(local_dir=str(corpus), seq_len=16)), tokenizer)
    rolling = load_task_data(RunConfig(task=TaskConfig(local_dir=str(corpus), seq_len=16, stride=4)), tokenizer)
    assert blocks.eval_labels is None and blocks.eval_blocks.shape == (2, 16)
    assert rolling.eval_labels is not None and rolling.eval_words == 8
    plain = evaluate_lm(model, blocks.eval_blocks, blocks.eval_words, 2)
    rolled = evaluate_lm(model, rolling.eval_blocks, rolling.eval_words, 2, rolling.eval_labels)
    assert plain["eval_tokens"] == 2 * 15 and rolled["eval_tokens"] == 40 - 1
    assert rolled["ppl"] != plain["ppl"] and rolled["ppl_causal_routing"] != rolled["ppl"]
