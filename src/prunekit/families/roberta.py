"""RoBERTa adapter. RoBERTa's encoder is BERT's with other class names (transformers'
``modular_roberta.py`` inherits it), so only the accepted classes and the classification head differ."""

from __future__ import annotations

from torch import nn
from transformers import RobertaForQuestionAnswering, RobertaForSequenceClassification, RobertaModel

from prunekit.families.bert import BertAdapter


class RobertaAdapter(BertAdapter):
    family = "roberta"
    model_types = ("roberta",)
    model_classes = {
        "sequence_classification": RobertaForSequenceClassification,
        "question_answering": RobertaForQuestionAnswering,
        "base": RobertaModel,
    }

    def _head_input_linears(self) -> list[nn.Linear]:
        # RobertaClassificationHead reads the <s> token of the residual stream through ``dense``;
        # its ``out_proj`` sees dense's full-width output and is left alone.
        linears = super()._head_input_linears()
        if isinstance(self.model, self.model_classes["sequence_classification"]):
            linears.append(self.model.classifier.dense)
        return linears
