"""RoBERTa adapter. RoBERTa's encoder is BERT's with other class names (transformers'
``modular_roberta.py`` inherits it), so only the accepted classes differ."""

from __future__ import annotations

from transformers import RobertaForQuestionAnswering, RobertaForSequenceClassification, RobertaModel

from .bert import BertAdapter


class RobertaAdapter(BertAdapter):
    family = "roberta"
    model_types = ("roberta",)
    model_classes = {
        "sequence_classification": RobertaForSequenceClassification,
        "question_answering": RobertaForQuestionAnswering,
        "base": RobertaModel,
    }
