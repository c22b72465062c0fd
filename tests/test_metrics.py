import math
import random

import pytest

from transformers_vpt.evaluation.metrics import (
    anls,
    bleu4,
    cider_d,
    exact_match,
    ground_truth,
    lcs_length,
    levenshtein,
    metric_family,
    normalize_answer,
    parse_yes_no,
    pope_metrics,
    rouge_l,
    score_dataset,
    score_items,
    vqa_accuracy,
)


def test_ground_truth_is_last_assistant_turn_without_prefix():
    messages = [
        {"role": "user", "content": "<image>\nWhat's the dog on? \nIdentify the region ..."},
        {"role": "assistant", "content": "<|region_token_start|><|x_0|><|y_0|><|region_token_end|>"},
        {"role": "user", "content": "<image>"},
        {"role": "assistant", "content": "Now answer the question.\npillow"},
    ]
    assert ground_truth(messages) == "pillow"
    with pytest.raises(ValueError):
        ground_truth([{"role": "user", "content": "hi"}])


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The Dog.", "dog"),
        ("Two", "2"),
        ("an apple and a pear", "apple and pear"),
        ("1,000", "1000"),
        ("3.5 kg.", "3.5 kg"),
        ("U.S.A.", "usa"),
        ("don't", "dont"),
        ("  red,  white & blue!? ", "red white blue"),
        ("t-shirt", "t shirt"),
        ("Now answer the question.\nYes", "yes"),
        ("", ""),
    ],
)
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def test_exact_match_and_vqa_accuracy():
    assert exact_match("The pillow.", "pillow") == 1.0
    assert exact_match("cushion", ["pillow", "Cushion"]) == 1.0
    assert exact_match("bed", "pillow") == 0.0
    # A single reference: VQA accuracy is exact match.
    assert vqa_accuracy("Pillow", "pillow") == 1.0
    # Ten annotators, two of them said "pillow": min(1, 2/3).
    refs = ["pillow", "pillow"] + ["cushion"] * 8
    assert vqa_accuracy("pillow", refs) == pytest.approx(2 / 3)
    assert vqa_accuracy("cushion", refs) == 1.0
    # Two references: the threshold is capped at 2, so one match gives 1/2.
    assert vqa_accuracy("pillow", ["pillow", "bed"]) == 0.5


def test_levenshtein():
    assert levenshtein("kitten", "sitting") == 3  # k->s, e->i, +g
    assert levenshtein("", "abc") == 3
    assert levenshtein("abc", "abc") == 0


def test_anls():
    assert anls("hallo", "hello") == pytest.approx(0.8)  # 1 edit / 5 chars -> 1 - 0.2
    assert anls("  Hello   World ", "hello world") == 1.0  # case and whitespace do not count
    assert anls("abc", "xyz") == 0.0  # distance 1.0
    assert anls("ab", "ac") == 0.0  # distance exactly 0.5 reaches the threshold
    assert anls("abcd", "abce") == pytest.approx(0.75)  # 1/4 < 0.5
    assert anls("hallo", ["xyz", "hello"]) == pytest.approx(0.8)  # best reference
    assert anls("", "") == 1.0


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Yes", "yes"),
        ("yes, there is a dog.", "yes"),
        ("No", "no"),
        ("There is not a dog in the image.", "no"),
        ("There isn't a dog.", "no"),
        ("Yes. There is no cat though.", "yes"),  # only the first sentence counts
        ("Now answer the question.\nNo", "no"),
    ],
)
def test_parse_yes_no(text, expected):
    assert parse_yes_no(text) == expected


def test_pope_metrics():
    predictions = ["yes", "No, there is not.", "Yes.", "no", "There isn't a dog."]
    references = ["yes", "no", "no", "yes", "no"]
    # parsed: yes, no, yes, no, no -> TP=1 (item 0), FP=1 (2), TN=2 (1, 4), FN=1 (3)
    metrics = pope_metrics(predictions, references)
    assert metrics == pytest.approx(
        {"accuracy": 3 / 5, "precision": 1 / 2, "recall": 1 / 2, "f1": 1 / 2, "yes_ratio": 2 / 5}
    )
    # No predicted "yes": precision, recall and F1 are 0 rather than a division error.
    assert pope_metrics(["no"], ["yes"]) == {
        "accuracy": 0.0,
        "precision": 0.0,
        "recall": 0.0,
        "f1": 0.0,
        "yes_ratio": 0.0,
    }


def test_bleu4_hand_computed():
    # clipped precisions: 1-grams 5/6, 2-grams 3/5 (ab bc cd), 3-grams 2/4 (abc bcd), 4-grams 1/3 (abcd);
    # equal lengths, no brevity penalty: (5/6 * 3/5 * 1/2 * 1/3) ** (1/4) = (1/12) ** (1/4)
    assert bleu4(["a b c d e f"], ["a b c d x f"]) == pytest.approx((1 / 12) ** 0.25)
    # all precisions 1, prediction 4 tokens vs reference 8: brevity penalty exp(1 - 8/4)
    assert bleu4(["a b c d"], ["a b c d e f g h"]) == pytest.approx(math.exp(-1))
    # closest reference length: 3 and 5 are both 1 away from 4, the shorter (3) wins, so no penalty
    assert bleu4(["a b c d"], [["a b c d e", "a b c"]]) == pytest.approx(1.0)
    assert bleu4(["a dog runs on the grass"], ["a dog runs on the grass"]) == pytest.approx(1.0)
    assert bleu4(["a dog runs on the grass"], ["two cats sleep"]) < 1e-6
    assert bleu4([""], ["a dog"]) == 0.0


def test_cider_d_hand_computed():
    # Two items, references "a b" and "c d": every reference n-gram has document frequency 1, so its weight is
    # log 2 - log 1 = log 2; unseen n-grams also get log 2.
    # Item 0 repeats its reference: cosine 1 for n = 1, 2; no 3-/4-grams (zero vectors count 0) -> 10 * 2/4 = 5.
    # Item 1 "c e" vs "c d": unigram cosine (L*L) / (sqrt2 L * sqrt2 L) = 1/2, bigram cosine 0 -> 10 * 0.5/4 = 1.25.
    assert cider_d(["a b", "c e"], ["a b", "c d"]) == pytest.approx([5.0, 1.25])
    # Four-word captions fill all four n-gram orders: a copy scores the maximum, 10.
    scores = cider_d(["a b c d", "e f g h"], ["a b c d", ["w x y z", "e f g h"]])
    assert scores[0] == pytest.approx(10.0)
    assert scores[1] == pytest.approx(5.0)  # mean over references: (0 + 10) / 2
    # Length penalty: the copy plus one unseen word keeps only part of its similarity.
    assert 0 < cider_d(["a b c d q", "e f g h"], ["a b c d", "e f g h"])[0] < 10.0
    # A single item has no informative document frequency: every weight is log 1 - log 1 = 0.
    assert cider_d(["a b"], ["a b"]) == [0.0]


def test_lcs_length_matches_dynamic_programming():
    def reference_lcs(a, b):
        table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
        for i, x in enumerate(a):
            for j, y in enumerate(b):
                table[i + 1][j + 1] = table[i][j] + 1 if x == y else max(table[i][j + 1], table[i + 1][j])
        return table[-1][-1]

    rng = random.Random(0)
    for _ in range(300):
        a = rng.choices("abcd", k=rng.randint(0, 15))
        b = rng.choices("abcde", k=rng.randint(0, 15))
        assert lcs_length(a, b) == reference_lcs(a, b)


def test_rouge_l():
    # LCS of "a b c d" and "a c d e" is "a c d": P = R = 3/4 -> F1 = 3/4
    assert rouge_l("a b c d", "a c d e") == pytest.approx(0.75)
    # LCS 2 ("a b"): P = 2/2, R = 2/4 -> F1 = 2 * 1 * 0.5 / 1.5 = 2/3
    assert rouge_l("A, b!", "a x b y") == pytest.approx(2 / 3)
    assert rouge_l("a b", ["x y", "a b"]) == 1.0
    assert rouge_l("", "a b") == 0.0


RELEASED_TEST_SETS = {
    "DocVQA_region_test_8cut": "anls",
    "TextVQA_region_test_8cut": "vqa",
    "TextCap_region_test_8cut": "caption",
    "DUDE_region_test": "anls",
    "GQA_region_test": "vqa",
    "OI_region_test": "vqa",
    "VSR_region_test": "vqa",
    "CUB_Birds_action_test": "vqa",
    "LLaVA_COCO_free_action_test": "free_form",
    "LLaVA_COCO_single_action_test": "free_form",
    "Flickr30k_action_test": "caption",
    "POPE_action_test": "pope",
}


@pytest.mark.parametrize(("name", "family"), RELEASED_TEST_SETS.items())
def test_metric_family_of_released_test_sets(name, family):
    assert metric_family(name) == family


def test_unknown_dataset_is_rejected():
    with pytest.raises(ValueError, match="no metric family"):
        metric_family("OIX_test")


def test_score_dataset_per_family():
    assert score_dataset("GQA_region_test", ["The pillow.", "bed"], ["pillow", "sofa"]) == {
        "exact_match": 0.5,
        "vqa_accuracy": 0.5,
    }
    assert score_dataset("DocVQA_region_test_8cut", ["hallo", "x"], ["hello", "y"]) == pytest.approx({"anls": 0.4})
    assert score_dataset("POPE_action_test", ["Yes", "No"], ["yes", "yes"]) == pytest.approx(
        {"accuracy": 0.5, "precision": 1.0, "recall": 0.5, "f1": 2 / 3, "yes_ratio": 0.5}
    )
    captions = score_dataset("Flickr30k_action_test", ["a b c d", "e f g h"], ["a b c d", "e f g h"])
    assert captions == pytest.approx({"cider": 10.0, "bleu4": 1.0})
    assert score_dataset("LLaVA_COCO_free_action_test", ["a b c d"], ["a c d e"]) == pytest.approx({"rouge_l": 0.75})
    assert score_dataset("GQA_region_test", [], []) == {}


def test_score_items():
    dude = score_items("DUDE_region_test", ["hallo", "x"], ["hello", ["y", "x"]])
    assert [item["anls"] for item in dude] == pytest.approx([0.8, 1.0])
    assert score_items("POPE_action_test", ["No.", "yes"], ["no", "no"]) == [{"accuracy": 1.0}, {"accuracy": 0.0}]
    captions = score_items("TextCap_region_test_8cut", ["a b", "c e"], ["a b", "c d"])
    assert [item["cider"] for item in captions] == pytest.approx([5.0, 1.25])
    with pytest.raises(ValueError, match="differ in length"):
        score_items("GQA_region_test", ["a"], ["a", "b"])
    with pytest.raises(ValueError, match="no reference"):
        score_items("GQA_region_test", ["a"], [[]])
