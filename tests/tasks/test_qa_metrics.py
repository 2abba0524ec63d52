"""Tests of prunekit.tasks.qa.metrics on hand-computed cases (SQuAD v1.1 and v2.0 rules)."""

from __future__ import annotations

import logging

import pytest

from prunekit.core.errors import DataError
from prunekit.tasks.qa.metrics import exact_match_score, f1_score, normalize_answer, squad_scores


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The  Cat, sat!", "cat sat"),
        ("An apple a day", "apple day"),
        ("theatre and anthem", "theatre and anthem"),  # articles only as whole words
        ("U.S.A.", "usa"),
        ("  \tDenver\nBroncos  ", "denver broncos"),
        ("the,", ""),  # punctuation goes first, so the article is then removed
        ("", ""),
    ],
)
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def test_exact_match():
    assert exact_match_score("the Eiffel Tower", "Eiffel tower.") == 1.0
    assert exact_match_score("Eiffel Tower", "Tower") == 0.0
    assert exact_match_score("", "a") == 1.0  # both normalise to ""


def test_f1_partial_overlap():
    # pred tokens [cat, sat, on, mat], gold [cat, on, mat]: 3 shared, P = 3/4, R = 1.
    assert f1_score("the cat sat on the mat", "a cat on a mat") == pytest.approx(2 * 0.75 / 1.75)


def test_f1_counts_repeated_tokens_once_each():
    # shared multiset {dog, cat}: P = R = 2/3.
    assert f1_score("dog dog cat", "dog cat cat") == pytest.approx(2 / 3)


def test_f1_no_overlap_and_empty():
    assert f1_score("Paris", "Berlin") == 0.0
    assert f1_score("", "Berlin") == 0.0
    assert f1_score("Paris", "") == 0.0
    assert f1_score("the", "") == 1.0  # v2.0: both empty
    assert f1_score("the", "", version_2=False) == 0.0  # v1.1 script quirk


def test_v1_scores_three_questions():
    references = {
        "q1": ["Denver Broncos", "Broncos"],
        "q2": ["Denver Broncos", "Broncos", "the Denver Broncos team"],
        "q3": ["Carolina Panthers"],
    }
    predictions = {"q1": "broncos.", "q2": "Denver", "q3": "Santa Clara"}
    scores = squad_scores(predictions, references)
    # q1: exact via the second gold. q2: F1 max(2/3 [P=1, R=1/2], 0, 1/2 [P=1, R=1/3]) = 2/3. q3: 0.
    assert scores["exact_match"] == pytest.approx(100 / 3)
    assert scores["f1"] == pytest.approx(100 * (1 + 2 / 3) / 3)
    assert scores["total"] == 3 and scores["missing"] == 0
    assert not any(key.startswith(("HasAns", "NoAns")) for key in scores)


def test_v1_perfect_and_none_predictions():
    references = {"q1": ["Paris"], "q2": ["Berlin"]}
    assert squad_scores({"q1": "paris", "q2": "The Berlin"}, references)["f1"] == 100.0
    assert squad_scores({"q1": "paris", "q2": None}, references)["exact_match"] == 50.0


def test_missing_predictions_count_as_wrong(caplog):
    references = {"q1": ["Paris"], "q2": ["Berlin"], "q3": ["Rome"], "q4": ["Madrid"]}
    with caplog.at_level(logging.WARNING):
        scores = squad_scores({"q1": "Paris", "extra": "Oslo"}, references)
    assert scores == {"exact_match": 25.0, "f1": 25.0, "total": 4, "missing": 3}
    assert "3 of 4 questions have no prediction" in caplog.text
    assert "1 predictions whose ids are not in the references" in caplog.text


def test_no_matching_ids_raises():
    with pytest.raises(DataError, match="None of the 1 prediction ids"):
        squad_scores({"x": "Paris"}, {"q1": ["Paris"]})


def test_bad_references():
    with pytest.raises(DataError, match="no references"):
        squad_scores({"q1": "Paris"}, {})
    with pytest.raises(DataError, match="version_2=True"):
        squad_scores({"q1": ""}, {"q1": []})
    with pytest.raises(DataError, match="wrap it in a list"):
        squad_scores({"q1": "Paris"}, {"q1": "Paris"})


def test_v2_no_answer_rules():
    references = {
        "a1": ["Paris"],  # answerable, right
        "a2": ["Berlin wall", "the wall"],  # answerable, abstained: 0
        "n1": [],  # unanswerable, abstained: 1
        "n2": [],  # unanswerable, answered: 0
        "n3": [],  # unanswerable, answer normalises to "": 1
    }
    predictions = {"a1": "Paris", "a2": "", "n1": "", "n2": "Rome", "n3": " The. "}
    scores = squad_scores(predictions, references, version_2=True)
    assert scores["exact_match"] == pytest.approx(60.0)
    assert scores["f1"] == pytest.approx(60.0)
    assert scores["total"] == 5 and scores["missing"] == 0
    assert (scores["HasAns_exact"], scores["HasAns_f1"], scores["HasAns_total"]) == (50.0, 50.0, 2)
    assert scores["NoAns_exact"] == pytest.approx(200 / 3)
    assert scores["NoAns_f1"] == pytest.approx(200 / 3)
    assert scores["NoAns_total"] == 3


def test_v2_partial_f1_and_group_keys():
    # Only answerable questions: no NoAns keys, as in the official v2.0 script.
    references = {"a1": ["the Denver Broncos"], "a2": ["Broncos"]}
    scores = squad_scores({"a1": "Denver", "a2": "broncos"}, references, version_2=True)
    # a1: P = 1, R = 1/2 -> F1 2/3; a2 exact.
    assert scores["exact_match"] == 50.0
    assert scores["f1"] == pytest.approx(100 * (2 / 3 + 1) / 2)
    assert scores["HasAns_total"] == 2 and "NoAns_total" not in scores


def test_v2_drops_golds_that_normalise_to_nothing():
    # "the" is dropped, so only "Paris" counts and the empty prediction scores 0.
    assert squad_scores({"q": ""}, {"q": ["the", "Paris"]}, version_2=True)["exact_match"] == 0.0
    # Every gold normalises to nothing: scored like "no answer", but grouped as answerable.
    scores = squad_scores({"q": ""}, {"q": ["."]}, version_2=True)
    assert scores["exact_match"] == 100.0 and scores["HasAns_total"] == 1


def test_v1_empty_normalised_gold_quirk():
    # v1.1: exact match 1, but F1 0 when neither side has a token.
    scores = squad_scores({"q": "a"}, {"q": ["The"]})
    assert scores["exact_match"] == 100.0 and scores["f1"] == 0.0
