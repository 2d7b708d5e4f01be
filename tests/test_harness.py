"""lm-evaluation-harness on a converted checkpoint, offline: two tiny local tasks (tests/fixtures/harness), one
scored by loglikelihood and one generated; the numbers must be the converted model's own."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lm_eval import simple_evaluate
from lm_eval.tasks import TaskManager

from mixsga_train.attention import AttentionConfig, convert_model, routers
from mixsga_train.evaluation.routing_scope import evaluating
from mixsga_train.harness import MixSGAHarnessLM
from mixsga_train.models.registry import ModelConfig, load_model

FIXTURES = Path(__file__).parent / "fixtures" / "harness"
TASKS = ["mixsga_tiny_choice", "mixsga_tiny_gen"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    model, tokenizer = load_model(ModelConfig(name="tiny", source="tiny", max_seq_len=128, tiny_layers=2))
    convert_model(model, AttentionConfig(method="mixsga", ratio="1:1:2"))
    torch.manual_seed(0)
    for router in routers(model):  # routers that disagree between top-k and argmax, as after training
        torch.nn.init.normal_(router.proj.weight, std=0.5)
    folder = tmp_path_factory.mktemp("harness") / "model"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def auto_run(checkpoint):
    """One harness run of both tasks under auto routing, counting the mixSGA caches ``generate()`` builds."""
    import mixsga_train.attention.convert as convert

    built, build_cache = [], convert.build_cache
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(convert, "build_cache", lambda model: built.append(1) or build_cache(model))
        patch.chdir(FIXTURES)  # the task YAMLs name their data file relative to the working directory
        lm = MixSGAHarnessLM(str(checkpoint), device="cpu")
        out = simple_evaluate(model=lm, tasks=TASKS, task_manager=TaskManager(include_path=str(FIXTURES)),
                              log_samples=True)
    return lm, out, len(built)


def own_loglikelihood(model, context_ids, continuation_ids, routing):
    ids = torch.tensor([context_ids + continuation_ids])
    with torch.no_grad(), evaluating(model, routing):
        logprobs = F.log_softmax(model(ids[:, :-1]).logits.float(), dim=-1)[0, len(context_ids) - 1:]
    return logprobs.gather(-1, torch.tensor(continuation_ids)[:, None]).sum().item()


def test_loglikelihoods_are_the_converted_models_under_topk_routing(auto_run):
    lm, out, _ = auto_run
    samples = out["samples"]["mixsga_tiny_choice"]
    assert len(samples) == 4 and 0 <= out["results"]["mixsga_tiny_choice"]["acc,none"] <= 1
    gaps = []
    for sample in samples:
        for (context, continuation), ((harness_ll, _),) in zip(sample["arguments"], sample["resps"]):
            context_ids, continuation_ids = lm._encode_pair(context, continuation)
            topk = own_loglikelihood(lm.model, context_ids, continuation_ids, "topk")
            assert harness_ll == pytest.approx(topk, abs=1e-4)
            gaps.append(abs(topk - own_loglikelihood(lm.model, context_ids, continuation_ids, "argmax")))
    assert max(gaps) > 1e-3, "routing made no difference, so this test could not see a wrong routing"


def test_argmax_routing_is_available_and_batches(checkpoint, monkeypatch):
    monkeypatch.chdir(FIXTURES)
    lm = MixSGAHarnessLM(str(checkpoint), routing="argmax", batch_size=4, device="cpu")
    out = simple_evaluate(model=lm, tasks=TASKS[:1], task_manager=TaskManager(include_path=str(FIXTURES)),
                          log_samples=True)
    (context, continuation), ((harness_ll, _),) = next(zip(out["samples"][TASKS[0]][0]["arguments"],
                                                           out["samples"][TASKS[0]][0]["resps"]))
    context_ids, continuation_ids = lm._encode_pair(context, continuation)
    assert harness_ll == pytest.approx(own_loglikelihood(lm.model, context_ids, continuation_ids, "argmax"), abs=1e-4)


def test_top_k_routing_refuses_padded_batches(checkpoint):
    with pytest.raises(ValueError, match="batch_size=1 or routing=argmax"):
        MixSGAHarnessLM(str(checkpoint), batch_size=4, device="cpu")


def test_generation_goes_through_generate_with_the_mixsga_cache(auto_run):
    lm, out, built = auto_run
    samples = out["samples"]["mixsga_tiny_gen"]
    assert built >= len(samples) == 4
    for sample in samples:
        (context, gen_kwargs), = sample["arguments"]
        prompt = lm.tok_encode(context)
        new = lm.model.generate(torch.tensor([prompt]), max_new_tokens=gen_kwargs["max_gen_toks"], do_sample=False)
        expected = lm.tok_decode(new[0, len(prompt):].tolist())  # the harness's own decoding
        for stop in [*gen_kwargs["until"], lm.tokenizer.eos_token]:
            expected = expected.split(stop)[0]
        assert sample["resps"][0][0] == expected


def test_mixsga_evaluate_harness_writes_lm_eval_results(checkpoint, tmp_path, monkeypatch, capsys):
    from mixsga_train.attention import saved_attention
    from mixsga_train.evaluate import main

    run_dir, corpus = tmp_path / "run", tmp_path / "corpus"
    run_dir.mkdir()
    corpus.mkdir()
    for name in ("valid.txt", "test.txt"):  # the run's own lm task is validated, not evaluated, by --harness
        (corpus / name).write_text("a few words of text\n" * 20)
    resolved = saved_attention(checkpoint)
    (run_dir / "config.yaml").write_text(
        "model: {name: tiny, source: tiny, max_seq_len: 128, tiny_layers: 2}\n"
        f"attention: {{method: mixsga, ratio: {list(resolved.ratio)}}}\n"
        f"task: {{name: tiny, kind: lm, local_dir: {corpus}, seq_len: 16}}\n"
    )
    monkeypatch.chdir(FIXTURES)
    main([str(run_dir), "--checkpoint", str(checkpoint), "--harness", ",".join(TASKS),
          "--harness-include", str(FIXTURES)])
    written = json.loads((run_dir / "harness.json").read_text())
    assert set(written["results"]) == set(TASKS) and written["routing"] == "auto"
    assert "mixsga_tiny_choice: acc" in capsys.readouterr().out


def test_an_unknown_task_is_named(checkpoint, monkeypatch):
    from mixsga_train.harness import run_harness

    monkeypatch.chdir(FIXTURES)
    with pytest.raises(ValueError, match="unknown lm-eval task.*no_such_task"):
        run_harness(checkpoint, ["no_such_task"], FIXTURES)


def test_the_name_mixsga_is_registered_with_lm_eval(checkpoint, monkeypatch):
    from lm_eval.api.registry import get_model

    assert get_model("mixsga") is MixSGAHarnessLM
    monkeypatch.chdir(FIXTURES)
    out = simple_evaluate(model="mixsga", model_args=f"pretrained={checkpoint},routing=argmax,dtype=float32",
                          batch_size=2, tasks=TASKS[:1], task_manager=TaskManager(include_path=str(FIXTURES)))
    assert 0 <= out["results"][TASKS[0]]["acc,none"] <= 1
