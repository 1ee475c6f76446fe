"""F1 score (macro-averaged over classes by default), an offline `evaluate` metric module."""

import datasets
import evaluate
from sklearn.metrics import f1_score


class F1(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="F1 score, the harmonic mean of precision and recall, averaged over classes.",
            citation="",
            inputs_description="predictions and references: lists of class ids; average: 'macro' (default) or sklearn's",
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references, average="macro"):
        return {"f1": float(f1_score(references, predictions, average=average))}
