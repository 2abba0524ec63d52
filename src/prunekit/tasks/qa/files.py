"""SQuAD v1.1 / v2.0 files: reading and validating them, and splitting examples by article.

- `load_squad` reads the official JSON format from a local file, or a `datasets` hub name
  ("squad", "squad_v2") when the source is not an existing path, and checks every field and
  every answer offset, so a bad file fails here with a message that says what to fix.
- `split_by_article` splits examples by article, keeping article order.

Examples are plain dicts, one per question; `prunekit.tasks.qa.features` turns them into model
features and `prunekit.tasks.qa.answers` maps predictions back to answer texts.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from prunekit.core.errors import DataError
from prunekit.core.preflight import read_utf8

logger = logging.getLogger(__name__)

__all__ = ["load_squad", "split_by_article"]


def load_squad(
    source: str | os.PathLike[str], version_2: bool = False, *, split: str = "validation"
) -> list[dict]:
    """Load SQuAD examples from an official JSON file or a `datasets` hub name.

    Args:
        source: path to a file in the official SQuAD format
            (`{"version", "data": [{"title", "paragraphs": [{"context", "qas": [...]}]}]}`), or,
            when no such path exists, a hub dataset name such as "squad" or "squad_v2".
        version_2: allow unanswerable questions (SQuAD v2.0). Loading a file that has them
            without this flag is an error, so v1.1 metrics are never computed on v2.0 data.
        split: split to take when loading from the hub (ignored for local files).

    Returns:
        One dict per question, in file order: "id", "title", "context", "question",
        "answers" ({"text": [...], "answer_start": [...]}, empty lists when unanswerable) and
        "is_impossible" (bool).

    Raises:
        DataError: missing file, invalid JSON (with line and column), a missing or mistyped
            field (with the question id), an answer whose text is not found at its
            answer_start, duplicate question ids, unanswerable questions without
            `version_2`, no examples, or a hub name that cannot be loaded.
    """
    path = Path(source)
    if path.is_file():
        examples = _load_json_file(path, version_2)
        where = str(path)
    elif path.exists():
        raise DataError(
            f"{path} is a directory; pass the SQuAD JSON file inside it (e.g. {path / 'dev-v1.1.json'})."
        )
    elif path.suffix.lower() == ".json" or path.is_absolute() or str(source).startswith("."):
        raise DataError(
            f"SQuAD file not found: {path}. Check the path, or download the official file "
            "(e.g. dev-v1.1.json) and point to it."
        )
    else:
        examples = _load_hub(str(source), version_2, split)
        where = f"hub dataset {source!r} (split {split!r})"
    if not examples:
        raise DataError(
            f"{where} holds no questions; check that it is a SQuAD file with a non-empty 'data' list."
        )
    n_impossible = sum(ex["is_impossible"] for ex in examples)
    logger.info("Loaded %d SQuAD questions (%d unanswerable) from %s", len(examples), n_impossible, where)
    return examples


def _load_json_file(path: Path, version_2: bool) -> list[dict]:
    """Parse and validate an official-format SQuAD JSON file."""
    try:
        raw = json.loads(read_utf8(path, "utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(
            f"{path} is not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}. "
            "Fix the file, or re-download the official SQuAD JSON."
        ) from exc

    if not isinstance(raw, dict) or "data" not in raw:
        raise DataError(
            f"{path}: the top level must be an object with a 'data' list of articles "
            '(official SQuAD format: {"version": ..., "data": [...]}).'
        )
    articles = _expect(raw["data"], list, "data", f"{path}")
    examples: list[dict] = []
    seen: set[str] = set()
    for a_idx, article in enumerate(articles):
        where = f"{path}: data[{a_idx}]"
        article = _expect(article, dict, "article", where)
        title = _expect(_field(article, "title", where), str, "title", where)
        paragraphs = _expect(_field(article, "paragraphs", where), list, "paragraphs", where)
        for p_idx, paragraph in enumerate(paragraphs):
            where = f"{path}: article {title!r}, paragraphs[{p_idx}]"
            paragraph = _expect(paragraph, dict, "paragraph", where)
            context = _expect(_field(paragraph, "context", where), str, "context", where)
            qas = _expect(_field(paragraph, "qas", where), list, "qas", where)
            for q_idx, qa in enumerate(qas):
                qa = _expect(qa, dict, "qas entry", f"{where}, qas[{q_idx}]")
                qid = _expect(_field(qa, "id", f"{where}, qas[{q_idx}]"), str, "id", f"{where}, qas[{q_idx}]")
                if qid in seen:
                    raise DataError(
                        f"{path}: question id {qid!r} appears twice; question ids must be unique."
                    )
                seen.add(qid)
                examples.append(
                    _parse_question(qa, qid, title, context, version_2, f"{path}: question {qid!r}")
                )
    return examples


def _parse_question(qa: dict, qid: str, title: str, context: str, version_2: bool, where: str) -> dict:
    """Validate one `qas` entry against its context and return it as an example dict."""
    question = _expect(_field(qa, "question", where), str, "question", where)
    answers = _expect(_field(qa, "answers", where), list, "answers", where)
    is_impossible = _expect(qa.get("is_impossible", not answers), bool, "is_impossible", where)
    if is_impossible and answers:
        raise DataError(
            f"{where} has is_impossible=true but {len(answers)} answers; an unanswerable question "
            "must have an empty 'answers' list (v2.0 keeps them under 'plausible_answers')."
        )
    if not is_impossible and not answers:
        raise DataError(f"{where} has an empty 'answers' list but is_impossible=false; add its answers.")
    if is_impossible and not version_2:
        raise DataError(
            f"{where} is unanswerable, which SQuAD v1.1 does not allow; this looks like a v2.0 file, "
            "so pass version_2=True."
        )
    texts: list[str] = []
    starts: list[int] = []
    for k, answer in enumerate(answers):
        a_where = f"{where}, answers[{k}]"
        answer = _expect(answer, dict, "answer", a_where)
        text = _expect(_field(answer, "text", a_where), str, "text", a_where)
        start = _field(answer, "answer_start", a_where)
        if isinstance(start, bool) or not isinstance(start, int):
            raise DataError(f"{a_where}: 'answer_start' must be an integer character offset, got {start!r}.")
        found = context[start : start + len(text)] if start >= 0 else ""
        if found != text:
            hint = context.find(text)
            fix = (
                f"the text occurs at offset {hint}" if hint >= 0 else "the text does not occur in the context"
            )
            raise DataError(
                f"{a_where}: context[{start}:{start + len(text)}] should be the answer text {text!r} "
                f"but reads {found!r} ({fix}); fix answer_start or the text."
            )
        texts.append(text)
        starts.append(start)
    return {
        "id": qid,
        "title": title,
        "context": context,
        "question": question,
        "answers": {"text": texts, "answer_start": starts},
        "is_impossible": is_impossible,
    }


def _field(obj: dict, name: str, where: str) -> Any:
    if name not in obj:
        raise DataError(f"{where} is missing the field {name!r}; add it (official SQuAD format).")
    return obj[name]


def _expect(value: Any, kind: type, name: str, where: str) -> Any:
    if not isinstance(value, kind):
        raise DataError(
            f"{where}: {name!r} must be a {kind.__name__}, got {type(value).__name__} ({value!r:.60})."
        )
    return value


def _load_hub(name: str, version_2: bool, split: str) -> list[dict]:
    """Load a SQuAD-style dataset from the Hugging Face hub (or the local `datasets` cache)."""
    import datasets  # imported only on this path: it is slow to import and local files do not need it

    try:
        rows = datasets.load_dataset(name, split=split)
    except Exception as exc:  # datasets raises many types (connection, not found, bad split)
        raise DataError(
            f"{name!r} is not an existing file, and loading it as a hub dataset failed ({exc}). "
            "Pass the path to an official SQuAD JSON file, or a reachable hub name such as 'squad'."
        ) from exc
    examples = []
    for row in rows:
        where = f"hub dataset {name!r}: question {row.get('id')!r}"
        for field in ("id", "title", "context", "question", "answers"):
            _field(row, field, where)
        answers = {"text": list(row["answers"]["text"]), "answer_start": list(row["answers"]["answer_start"])}
        is_impossible = not answers["text"]
        if is_impossible and not version_2:
            raise DataError(
                f"{where} is unanswerable; {name!r} looks like SQuAD v2.0, so pass version_2=True."
            )
        fields = {key: row[key] for key in ("id", "title", "context", "question")}
        examples.append({**fields, "answers": answers, "is_impossible": is_impossible})
    return examples


def split_by_article(
    source_or_examples: str | os.PathLike[str] | Sequence[Mapping],
    first_n: int,
    *,
    version_2: bool = False,
) -> tuple[list[dict], list[dict]]:
    """Split SQuAD examples into the first `first_n` articles and the rest.

    Articles are runs of consecutive examples with the same title, in file order; splitting by
    article keeps every paragraph of an article on one side, so no context leaks between the
    two parts. (The benchmark uses dev-v1.1: 24 articles to prune on, 24 to evaluate.)

    Args:
        source_or_examples: a path or hub name for `load_squad`, or examples it returned.
        first_n: number of articles in the first part; 0 < first_n < number of articles.
        version_2: passed to `load_squad` when a source is given.

    Returns:
        (examples of the first `first_n` articles, examples of the remaining articles).
    """
    if isinstance(source_or_examples, str | os.PathLike):
        examples = load_squad(source_or_examples, version_2=version_2)
    else:
        examples = [dict(ex) for ex in source_or_examples]
    if not examples:
        raise DataError("split_by_article got no examples; load a SQuAD file first.")
    n_articles = 0
    cut = len(examples)
    previous_title: object = object()  # a sentinel equal to no title
    for i, ex in enumerate(examples):
        if ex["title"] != previous_title:
            if n_articles == first_n:
                cut = i
            n_articles += 1
            previous_title = ex["title"]
    if not 0 < first_n < n_articles:
        raise DataError(
            f"first_n={first_n} must be between 1 and {n_articles - 1}: the data has {n_articles} articles "
            "and both parts must be non-empty."
        )
    return examples[:cut], examples[cut:]
