"""ROUGE-L (rouge_score rougeL, stemmed, F x100, max over references, mean over examples) on hand-computed cases."""

import pytest

from mixsga_train.evaluation.rouge import mean_rouge_l, rouge_l


def test_identical_is_100_and_disjoint_is_0():
    assert rouge_l("the cat sat on the mat", ["the cat sat on the mat"]) == pytest.approx(100.0)
    assert rouge_l("blue sky", ["green grass"]) == 0.0
    assert rouge_l("", ["green grass"]) == 0.0


def test_known_lcs_value():
    # LCS("the cat sat on the mat", "the cat on the mat") = 5 words: P = 5/6, R = 5/5, F = 10/11.
    assert rouge_l("the cat sat on the mat", ["the cat on the mat"]) == pytest.approx(100 * 10 / 11)
    # LCS("a b c d", "a c e") = 2 ("a c"): P = 2/4, R = 2/3, F = 4/7.
    assert rouge_l("a b c d", ["a c e"]) == pytest.approx(100 * 4 / 7)


def test_max_over_references():
    refs = ["green grass", "the cat on the mat", "the cat sat on the mat"]
    assert rouge_l("the cat sat on the mat", refs) == pytest.approx(100.0)
    assert rouge_l("the cat sat on the mat", refs[:2]) == pytest.approx(100 * 10 / 11)


def test_stemming_lowercasing_and_punctuation():
    assert rouge_l("Running dogs!", ["run dog"]) == pytest.approx(100.0)  # Porter stems: running->run, dogs->dog
    assert rouge_l("Hello, World.", ["hello world"]) == pytest.approx(100.0)


def test_mean_over_examples_and_errors():
    assert mean_rouge_l(["a b", "x"], [["a b"], ["y"]]) == pytest.approx(50.0)
    with pytest.raises(ValueError):
        mean_rouge_l(["a"], [])
    with pytest.raises(ValueError):
        rouge_l("a", [])


def test_offline_rouge_is_rouge_scores_score_multi():
    from rouge_score import rouge_scorer

    from mixsga_train.evaluation.rouge import hub_metric, rouge_l_scores

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    predictions = ["the cats sat on the mat", "blue sky today", "a b c d"]
    references = [["a cat sat", "the cat sat on a mat"], ["green grass"], ["a c e", "b d", "a b"]]
    expected = [100 * scorer.score_multi(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references)]
    if hub_metric() is None:  # offline (as in CI): the direct computation
        assert rouge_l_scores(predictions, references) == expected
    assert rouge_l_scores(predictions, references) == pytest.approx(expected, abs=1e-9)
    assert expected[2] == pytest.approx(100 * 2 * (2 / 4) * 1 / (2 / 4 + 1))  # "a b" fully matched: P 2/4, R 1


def test_evaluate_rouge_metric_agrees_with_the_offline_computation():
    """Runs where the Hub is reachable (evaluate's rouge metric is a Hub module); offline it cannot load."""
    import evaluate
    from rouge_score import rouge_scorer

    try:
        metric = evaluate.load("rouge")
    except OSError as err:
        pytest.skip(f"evaluate.load('rouge') needs the Hub ({type(err).__name__})")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    predictions = ["the cats sat on the mat", "Running dogs!"]
    references = [["a cat sat", "the cat sat on a mat"], ["run dog"]]
    hub = metric.compute(predictions=predictions, references=references, rouge_types=["rougeL"], use_stemmer=True,
                         use_aggregator=False)["rougeL"]
    assert hub == pytest.approx([scorer.score_multi(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references)])
