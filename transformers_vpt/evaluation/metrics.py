"""Judge-free answer metrics for the VPT test sets.

Upstream scores every answer with an LLM judge only (see ``evaluation.judge``). These metrics give a free,
deterministic second opinion, one family per dataset: normalised exact match / VQA accuracy for short answers,
ANLS for document VQA, yes/no statistics for POPE, CIDEr-D and BLEU-4 for captions and ROUGE-L for free-form
answers. Every reference may be a single string or a list of acceptable strings.

Predictions and references both lose the leading ``"Now answer the question.\\n"`` that some training sets put
before the answer (the model learns to emit it too); it carries no content.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence

ANSWER_PREFIX = "Now answer the question.\n"

Reference = str | Sequence[str]


def strip_answer_prefix(text: str) -> str:
    """``text`` without the leading ``ANSWER_PREFIX``."""
    return text.removeprefix(ANSWER_PREFIX)


def ground_truth(messages: Sequence[Mapping[str, str]]) -> str:
    """Reference answer of a ShareGPT record: its last assistant turn, without ``ANSWER_PREFIX``."""
    for message in reversed(messages):
        if message["role"] == "assistant":
            return strip_answer_prefix(message["content"])
    raise ValueError("the record has no assistant turn")


# --- short answers: normalised exact match and VQA accuracy -------------------------------------------------------

_NUMBER_WORDS = {
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
_ARTICLES = frozenset({"a", "an", "the"})
_THOUSANDS_SEPARATOR = re.compile(r"(?<=\d),(?=\d)")
# Periods (except decimal points) and apostrophes join their neighbours: "U.S.A." -> "usa", "don't" -> "dont".
_JOINING_PUNCTUATION = re.compile(r"(?!(?<=\d)\.(?=\d))[.'\u2019]")
_OTHER_PUNCTUATION = re.compile(r"[^\w\s.]|_")


def normalize_answer(text: str) -> str:
    """TextVQA-style normal form: lowercase, no punctuation, no articles, number words as digits.

    "The Two Dogs." -> "2 dogs"; "1,000" -> "1000"; "3.5" stays "3.5"; other punctuation becomes a space.
    """
    text = strip_answer_prefix(text).lower()
    text = _THOUSANDS_SEPARATOR.sub("", text)
    text = _JOINING_PUNCTUATION.sub("", text)
    text = _OTHER_PUNCTUATION.sub(" ", text)
    words = (_NUMBER_WORDS.get(word, word) for word in text.split())
    return " ".join(word for word in words if word not in _ARTICLES)


def _as_list(reference: Reference) -> list[str]:
    references = [reference] if isinstance(reference, str) else list(reference)
    if not references:
        raise ValueError("an item has no reference")
    return references


def exact_match(prediction: str, references: Reference) -> float:
    """1.0 when the normalised prediction equals any normalised reference."""
    answer = normalize_answer(prediction)
    return float(any(answer == normalize_answer(r) for r in _as_list(references)))


def vqa_accuracy(prediction: str, references: Reference) -> float:
    """VQA accuracy ``min(1, matches / 3)``, the 3-annotator threshold capped by the number of references.

    With the usual 10 annotator answers this is the VQA/TextVQA rule; with a single reference it is exact match.
    """
    references = _as_list(references)
    answer = normalize_answer(prediction)
    matches = sum(answer == normalize_answer(r) for r in references)
    return min(1.0, matches / min(3, len(references)))


# --- document VQA: ANLS --------------------------------------------------------------------------------------------


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions all cost 1)."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, 1):
        current = [i]
        for j, char_b in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b)))
        previous = current
    return previous[-1]


def anls(prediction: str, references: Reference, threshold: float = 0.5) -> float:
    """Average Normalised Levenshtein Similarity of one answer (DocVQA / DUDE rule).

    Strings are compared lowercased with whitespace collapsed. Against each reference the similarity is
    ``1 - distance / max(len)``, or 0 once that normalised distance reaches ``threshold``; the best reference counts.
    """

    def canonical(text: str) -> str:
        return " ".join(strip_answer_prefix(text).lower().split())

    answer = canonical(prediction)
    best = 0.0
    for reference in map(canonical, _as_list(references)):
        longest = max(len(answer), len(reference))
        distance = levenshtein(answer, reference) / longest if longest else 0.0
        best = max(best, 1.0 - distance if distance < threshold else 0.0)
    return best


# --- POPE: yes/no --------------------------------------------------------------------------------------------------

_NEGATION = re.compile(r"\b(?:no|not)\b|n't\b")


def parse_yes_no(text: str) -> str:
    """Answer "no" when the first sentence holds a negation (no, not, -n't), else "yes".

    This is the usual POPE convention, so an answer without any negation (even an evasive one) counts as "yes".
    """
    first_sentence = strip_answer_prefix(text).lower().replace("\u2019", "'").split(".")[0]
    return "no" if _NEGATION.search(first_sentence) else "yes"


def pope_metrics(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Accuracy, precision, recall and F1 with "yes" as the positive class, and the share of "yes" predictions."""
    pairs = [(parse_yes_no(p), parse_yes_no(r)) for p, r in zip(predictions, references, strict=True)]
    true_pos = sum(p == r == "yes" for p, r in pairs)
    predicted_yes = sum(p == "yes" for p, _ in pairs)
    actual_yes = sum(r == "yes" for _, r in pairs)
    precision = true_pos / predicted_yes if predicted_yes else 0.0
    recall = true_pos / actual_yes if actual_yes else 0.0
    return {
        "accuracy": sum(p == r for p, r in pairs) / len(pairs),
        "precision": precision,
        "recall": recall,
        "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
        "yes_ratio": predicted_yes / len(pairs),
    }


# --- captions and free-form answers: token overlap -----------------------------------------------------------------


def tokenize(text: str) -> list[str]:
    """Lowercased alphanumeric words, a simple stand-in for the PTB tokenizer (which needs Java)."""
    return re.findall(r"[a-z0-9]+", strip_answer_prefix(text).lower())


def _ngram_counts(tokens: Sequence[str], max_n: int) -> Counter[tuple[str, ...]]:
    return Counter(tuple(tokens[i : i + n]) for n in range(1, max_n + 1) for i in range(len(tokens) - n + 1))


def bleu4(predictions: Sequence[str], references: Sequence[Reference]) -> float:
    """Corpus BLEU-4 (uniform weights) as the COCO caption toolkit reports it.

    Clipped n-gram counts and lengths are summed over the corpus; the brevity penalty uses, per item, the
    reference length closest to the prediction's (the shorter one on a tie). Tiny additive constants keep a
    corpus without a matching 4-gram at ~0 instead of failing on log(0).
    """
    matched, total = [0] * 4, [0] * 4
    prediction_length = reference_length = 0
    for prediction, reference in zip(predictions, references, strict=True):
        hypothesis = tokenize(prediction)
        candidates = [tokenize(r) for r in _as_list(reference)]
        prediction_length += len(hypothesis)
        reference_length += min((abs(len(c) - len(hypothesis)), len(c)) for c in candidates)[1]
        clip = Counter()
        for candidate in candidates:
            clip |= _ngram_counts(candidate, 4)
        for ngram, count in _ngram_counts(hypothesis, 4).items():
            matched[len(ngram) - 1] += min(count, clip[ngram])
        for n in range(1, 5):
            total[n - 1] += max(len(hypothesis) - n + 1, 0)
    if not prediction_length:
        return 0.0
    log_precision = sum(math.log((m + 1e-15) / (t + 1e-9)) for m, t in zip(matched, total)) / 4
    brevity = min(0.0, 1.0 - reference_length / prediction_length)
    return math.exp(log_precision + brevity)


def cider_d(predictions: Sequence[str], references: Sequence[Reference], sigma: float = 6.0) -> list[float]:
    """CIDEr-D of each prediction (Vedantam et al. 2015, as in the COCO caption toolkit), scaled by 10.

    For n = 1..4, predictions and references become TF-IDF vectors of n-gram counts, the document frequency being
    the number of items whose references contain the n-gram (so the corpus matters: a single item scores 0).
    The score is the cosine similarity with the prediction's weights clipped at the reference's, times a
    Gaussian penalty on the length difference, averaged over references and over n.
    """
    max_n = 4
    hypotheses = [tokenize(p) for p in predictions]
    reference_sets = [[tokenize(r) for r in _as_list(reference)] for reference in references]
    if len(hypotheses) != len(reference_sets):
        raise ValueError("predictions and references differ in length")
    document_frequency = Counter(
        ngram for refs in reference_sets for ngram in set().union(*(_ngram_counts(r, max_n) for r in refs))
    )
    log_items = math.log(max(len(reference_sets), 1))

    def weights(tokens: list[str]) -> tuple[list[dict[tuple[str, ...], float]], list[float]]:
        vectors: list[dict[tuple[str, ...], float]] = [{} for _ in range(max_n)]
        for ngram, count in _ngram_counts(tokens, max_n).items():
            vectors[len(ngram) - 1][ngram] = count * (log_items - math.log(max(1, document_frequency[ngram])))
        return vectors, [math.sqrt(sum(w * w for w in vector.values())) for vector in vectors]

    scores = []
    for hypothesis, refs in zip(hypotheses, reference_sets):
        hyp_vectors, hyp_norms = weights(hypothesis)
        total = 0.0
        for ref in refs:
            ref_vectors, ref_norms = weights(ref)
            penalty = math.exp(-((len(hypothesis) - len(ref)) ** 2) / (2 * sigma**2))
            for hyp_vector, ref_vector, hyp_norm, ref_norm in zip(hyp_vectors, ref_vectors, hyp_norms, ref_norms):
                if hyp_norm and ref_norm:
                    overlap = sum(
                        min(w, ref_vector.get(g, 0.0)) * ref_vector.get(g, 0.0) for g, w in hyp_vector.items()
                    )
                    total += penalty * overlap / (hyp_norm * ref_norm)
        scores.append(10.0 * total / (max_n * len(refs)))
    return scores


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence, bit-parallel over ``b`` (Hyyrö 2004): O(len(a)) big-int steps."""
    positions: dict[str, int] = {}
    for i, token in enumerate(b):
        positions[token] = positions.get(token, 0) | (1 << i)
    full = (1 << len(b)) - 1
    row = full
    for token in a:
        common = row & positions.get(token, 0)
        row = ((row + common) | (row - common)) & full
    return len(b) - row.bit_count()


def rouge_l(prediction: str, references: Reference) -> float:
    """ROUGE-L F1 (LCS precision and recall equally weighted) over ``tokenize`` words; the best reference counts."""
    hypothesis = tokenize(prediction)
    best = 0.0
    for reference in map(tokenize, _as_list(references)):
        common = lcs_length(hypothesis, reference)
        if common:
            precision, recall = common / len(hypothesis), common / len(reference)
            best = max(best, 2 * precision * recall / (precision + recall))
    return best


# --- registry ------------------------------------------------------------------------------------------------------

# Dataset-name prefix -> metric family; the released test sets are e.g. "DocVQA_region_test_8cut", "POPE_action_test".
_FAMILY_BY_PREFIX = {
    "DocVQA": "anls",
    "DUDE": "anls",
    "TextVQA": "vqa",
    "GQA": "vqa",
    "OI": "vqa",
    "VSR": "vqa",
    "CUB_Birds": "vqa",
    "POPE": "pope",
    "TextCap": "caption",
    "Flickr30k": "caption",
    "LLaVA_COCO": "free_form",
    "synthetic": "vqa",  # the demo's one-word answers (scripts/make_synthetic_data.py)
}

_ITEM_SCORERS: dict[str, Callable[[str, list[str]], dict[str, float]]] = {
    "vqa": lambda p, r: {"exact_match": exact_match(p, r), "vqa_accuracy": vqa_accuracy(p, r)},
    "anls": lambda p, r: {"anls": anls(p, r)},
    "pope": lambda p, r: {"accuracy": float(parse_yes_no(p) == parse_yes_no(r[0]))},
    "free_form": lambda p, r: {"rouge_l": rouge_l(p, r)},
}


def metric_family(dataset_name: str) -> str:
    """Metric family of a dataset, matched on its name's prefix: vqa, anls, pope, caption or free_form."""
    for prefix, family in _FAMILY_BY_PREFIX.items():
        if dataset_name == prefix or dataset_name.startswith(prefix + "_"):
            return family
    raise ValueError(f"no metric family for dataset {dataset_name!r}; known prefixes: {sorted(_FAMILY_BY_PREFIX)}")


def score_items(
    dataset_name: str, predictions: Sequence[str], references: Sequence[Reference]
) -> list[dict[str, float]]:
    """Per-item metric values, e.g. ``[{"anls": 0.8}, ...]``; captions get their CIDEr-D against the whole corpus."""
    reference_lists = [_as_list(r) for r in references]
    if len(predictions) != len(reference_lists):
        raise ValueError("predictions and references differ in length")
    family = metric_family(dataset_name)
    if family == "caption":
        return [{"cider": score} for score in cider_d(predictions, reference_lists)]
    return [_ITEM_SCORERS[family](p, r) for p, r in zip(predictions, reference_lists)]


def score_dataset(dataset_name: str, predictions: Sequence[str], references: Sequence[Reference]) -> dict[str, float]:
    """Aggregate metrics of a dataset (empty for no items).

    vqa: exact_match, vqa_accuracy; anls: anls; pope: accuracy, precision, recall, f1, yes_ratio;
    caption: cider (mean CIDEr-D), bleu4 (corpus BLEU-4); free_form: rouge_l. Per-item values are averaged except
    POPE's ratios and BLEU-4, which are corpus statistics.
    """
    if not predictions:
        return {}
    family = metric_family(dataset_name)
    if family == "pope":
        return pope_metrics(predictions, [_as_list(r)[0] for r in references])
    items = score_items(dataset_name, predictions, references)
    means = {key: sum(item[key] for item in items) / len(items) for key in items[0]}
    if family == "caption":
        means["bleu4"] = bleu4(predictions, references)
    return means
