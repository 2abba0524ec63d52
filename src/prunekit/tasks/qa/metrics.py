"""SQuAD exact match and F1, following the rules of the official evaluation scripts.

This module owns the extractive-QA metric of prunekit (issue "SQuAD data and metric", item 3):
answer normalisation, per-answer exact match and token F1, and the corpus-level scores
for SQuAD v1.1 and v2.0. It is written from the published rules, not copied from the scripts:

- Normalisation: lower case, remove ASCII punctuation, remove the articles "a", "an", "the"
  as whole words, collapse whitespace.
- A question's score is the maximum over its gold answers.
- v2.0: a question with no gold answer is unanswerable and scores 1 only when the prediction
  is empty (after normalisation). Gold answers that normalise to the empty string are dropped,
  and token F1 is 1 when both sides normalise to no tokens.
- v1.1: every question has at least one gold answer, and token F1 is 0 whenever the
  prediction and gold share no token, even when both are empty (a quirk of the v1.1 script,
  kept so our numbers equal the published ones).

Scores returned by `squad_scores` are on a 0-100 scale; the per-answer helpers return 0-1.
Missing predictions count as wrong: they score 0, stay in the total, and their number is
reported under "missing". If no prediction matches any reference id at all, the ids are almost
certainly mismatched, and `squad_scores` raises a `DataError` instead of reporting zero.
"""

from __future__ import annotations

import collections
import logging
import re
import string
from collections.abc import Mapping, Sequence

from prunekit.core.errors import DataError

logger = logging.getLogger(__name__)

__all__ = ["normalize_answer", "exact_match_score", "f1_score", "squad_scores"]

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
    """Normalise an answer the way the official SQuAD scripts do.

    The steps run in the official order: lower case, strip punctuation, drop articles, then
    collapse runs of whitespace into single spaces (which also trims both ends).
    """
    text = text.lower()
    # Punctuation goes before articles so that "the," still loses its article.
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match_score(prediction: str, ground_truth: str) -> float:
    """1.0 when both strings are equal after `normalize_answer`, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(ground_truth))


def f1_score(prediction: str, ground_truth: str, *, version_2: bool = True) -> float:
    """Token-overlap F1 (0-1) between a prediction and one gold answer, after normalisation.

    Tokens are the whitespace-separated words of the normalised strings, counted as a
    multiset. With `version_2=True` (the default, and the v2.0 rule) two strings that both
    normalise to no tokens score 1, and one empty side against a non-empty one scores 0.
    With `version_2=False` the v1.1 rule applies: no shared token means 0, even for two
    empty strings.
    """
    pred_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(ground_truth).split()
    if version_2 and (not pred_tokens or not gold_tokens):
        return float(pred_tokens == gold_tokens)
    overlap = collections.Counter(pred_tokens) & collections.Counter(gold_tokens)
    n_same = sum(overlap.values())
    if n_same == 0:
        return 0.0
    precision = n_same / len(pred_tokens)
    recall = n_same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def _score_question(prediction: str, golds: Sequence[str], version_2: bool) -> tuple[float, float]:
    """(exact, f1) of one prediction against its gold list, each the maximum over the golds."""
    if version_2:
        # v2.0 drops golds that normalise to nothing; an empty list means "no answer",
        # which is scored as matching the empty string.
        golds = [g for g in golds if normalize_answer(g)] or [""]
    exact = max(exact_match_score(prediction, g) for g in golds)
    f1 = max(f1_score(prediction, g, version_2=version_2) for g in golds)
    return exact, f1


def squad_scores(
    predictions: Mapping[str, str],
    references: Mapping[str, Sequence[str]],
    version_2: bool = False,
) -> dict[str, float | int]:
    """Corpus exact match and F1 (0-100) of SQuAD predictions.

    Args:
        predictions: question id -> predicted answer text; "" (or None) means "no answer".
            Ids not in `references` are ignored (and logged).
        references: question id -> list of gold answer texts. An empty list marks an
            unanswerable question, which is only allowed with `version_2=True`.
        version_2: apply the SQuAD v2.0 rules (unanswerable questions, empty-answer F1).

    Returns:
        {"exact_match", "f1"} on a 0-100 scale, "total" (number of reference questions) and
        "missing" (reference questions without a prediction; they score 0). With
        `version_2=True` also "HasAns_exact", "HasAns_f1", "HasAns_total" for answerable
        questions and "NoAns_exact", "NoAns_f1", "NoAns_total" for unanswerable ones; as in
        the official v2.0 script, a group's keys appear only when it has questions.

    Raises:
        DataError: no references; an empty gold list without `version_2`; or not a single
            prediction id matches a reference id.
    """
    if not references:
        raise DataError("squad_scores got no references; pass question id -> list of gold answer texts.")
    matched = sum(1 for qid in references if qid in predictions)
    if matched == 0:
        some_ref = next(iter(references))
        some_pred = next(iter(predictions), None)
        raise DataError(
            f"None of the {len(predictions)} prediction ids matches any of the {len(references)} "
            f"reference ids (e.g. reference {some_ref!r}, prediction {some_pred!r}); key predictions by "
            "the question ids of the evaluated dataset."
        )
    extra = sum(1 for qid in predictions if qid not in references)
    if extra:
        logger.warning("Ignoring %d predictions whose ids are not in the references.", extra)

    groups: dict[str, list[tuple[float, float]]] = {"HasAns": [], "NoAns": []}
    missing = 0
    for qid, golds in references.items():
        if isinstance(golds, str):
            # A bare string would be scored character by character; refuse it early.
            raise DataError(
                f"References for question {qid!r} must be a list of answer texts, got the string "
                f"{golds!r}; wrap it in a list."
            )
        if not golds and not version_2:
            raise DataError(
                f"Question {qid!r} has no gold answer, which SQuAD v1.1 does not allow; pass "
                "version_2=True to score unanswerable questions."
            )
        if qid in predictions:
            prediction = predictions[qid] or ""
            scores = _score_question(prediction, golds, version_2)
        else:
            missing += 1
            scores = (0.0, 0.0)
        groups["HasAns" if golds else "NoAns"].append(scores)
    if missing:
        logger.warning("%d of %d questions have no prediction and score 0.", missing, len(references))

    every = groups["HasAns"] + groups["NoAns"]
    result: dict[str, float | int] = {
        "exact_match": 100.0 * sum(e for e, _ in every) / len(every),
        "f1": 100.0 * sum(f for _, f in every) / len(every),
        "total": len(every),
        "missing": missing,
    }
    if version_2:
        for name, scores in groups.items():
            if scores:
                result[f"{name}_exact"] = 100.0 * sum(e for e, _ in scores) / len(scores)
                result[f"{name}_f1"] = 100.0 * sum(f for _, f in scores) / len(scores)
                result[f"{name}_total"] = len(scores)
    return result
