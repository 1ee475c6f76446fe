"""Perplexity from per-sequence summed negative log-likelihoods and token counts (an offline `evaluate` module).

exp(total NLL / total predicted tokens): the corpus-level perplexity, not a mean of per-sequence perplexities.
"""

import math

import datasets
import evaluate


class Perplexity(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Corpus perplexity: exp of the mean token negative log-likelihood.",
            citation="",
            inputs_description="nll: summed token NLL (nats) per sequence; num_tokens: predicted tokens per sequence",
            features=datasets.Features({"nll": datasets.Value("float64"), "num_tokens": datasets.Value("int64")}),
        )

    def _compute(self, nll, num_tokens):
        total_tokens = sum(num_tokens)
        mean_nll = sum(nll) / total_tokens
        return {"perplexity": math.exp(mean_nll), "mean_nll": mean_nll, "num_tokens": total_tokens}
