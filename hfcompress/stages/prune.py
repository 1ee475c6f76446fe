"""`prune`: remove whole layers, attention heads, FFN neurons and hidden channels (the residual width), chosen by
measured importance (or at random, as the control that importance must beat), and the vocabulary entries the
training split never uses. `round_to` keeps every width it chooses a multiple of a kernel's block.
Recovery is the next stage in the recipe: a short finetune or distill.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections import Counter
from typing import Literal

import torch
from pydantic import Field, model_validator

from ..data import load_split_texts
from ..errors import HfCompressError
from ..evaluation import count_parameters, size_on_disk
from ..pruning import (
    adapter_for,
    hidden_importance,
    hidden_size_multiple,
    norm_corrections,
    prune_hidden,
    select_hidden,
    ffn_importance,
    head_importance,
    layer_importance,
    layer_shapes,
    needs_structure_record,
    prune_ffn,
    prune_heads,
    prune_layers,
    save_pruned,
    select_ffn,
    select_heads,
    select_layers,
)
from ..pruning.vocabulary import (
    apply_vocabulary,
    check_same_pieces,
    check_training_tokens_kept,
    count_tokens,
    select_vocabulary,
    slice_vocabulary,
    unknown_rate,
)
from ..recipe_schema import StrictModel
from ..sources import resolve_model_reference
from .base import Stage, StageContext, StageOptions, StageResult, register_stage

logger = logging.getLogger(__name__)


class _Budget(StrictModel):
    sparsity: float | None = Field(None, gt=0, lt=1)
    count: int | None = Field(None, ge=1)
    scope: Literal["global", "uniform"] = "global"

    @model_validator(mode="after")
    def _one_budget(self):
        if (self.sparsity is None) == (self.count is None):
            raise ValueError("give exactly one of `sparsity` (a fraction) or `count`")
        return self


class HeadBudget(_Budget):
    min_per_layer: int = Field(1, ge=1, description="never empty a layer by head pruning; drop layers instead")
    group_strategy: Literal["whole_groups", "heads_per_group"] = "whole_groups"  # grouped-query attention


class FfnBudget(_Budget):
    method: Literal["gradient", "magnitude"] = "gradient"


class HiddenBudget(StrictModel):
    """The residual width: `size` channels kept, or `sparsity` of them removed (the kept width then rounded)."""

    size: int | None = Field(None, ge=1, description="hidden size to keep")
    sparsity: float | None = Field(None, gt=0, lt=1)
    method: Literal["activation", "gradient"] = "activation"
    norms: Literal["rescale", "keep"] = Field(
        "rescale", description="rescale: fold the measured change of each norm's statistics into its weight (and "
                               "LayerNorm's bias); keep: leave the norms' parameters as they are")

    @model_validator(mode="after")
    def _one_budget(self):
        if (self.size is None) == (self.sparsity is None):
            raise ValueError("give exactly one of `size` (channels kept) or `sparsity` (a fraction)")
        return self


class LayerBudget(StrictModel):
    drop: int = Field(ge=1)
    method: Literal["block_influence", "loss"] = "block_influence"


class VocabularyBudget(StrictModel):
    """Keep the tokens of the training split (never validation or test), special tokens and `keep`."""

    min_frequency: int = Field(1, ge=1, description="occurrences in the training split a token needs to stay")
    keep_top: int = Field(0, ge=0, description="also keep the lowest ids (base characters, most frequent merges)")
    keep: list[str] = Field(default_factory=list, description="tokens kept whatever their frequency")
    max_training_tokens_lost: float = Field(0.5, ge=0, le=1, description="refuse a vocabulary that prunes a larger "
                                                                          "share of the training split's tokens")


class PruneOptions(StageOptions):
    layers: LayerBudget | None = None
    heads: HeadBudget | None = None
    ffn: FfnBudget | None = None
    hidden: HiddenBudget | None = None
    vocabulary: VocabularyBudget | None = None
    round_to: int | None = Field(None, ge=2, description="every width this stage chooses (heads x head size, FFN, "
                                                         "hidden) becomes a multiple of this, e.g. 32 for 4-bit "
                                                         "kernels that quantize blocks of 32 inputs")
    selection: Literal["importance", "random"] = "importance"
    seed: int | None = Field(None, description="random selection: its seed (default: the recipe's)")
    calibration_samples: int = Field(256, ge=1)
    calibration_batch_size: int = Field(16, ge=1)

    @model_validator(mode="after")
    def _something_to_prune(self):
        if not (self.layers or self.heads or self.ffn or self.hidden or self.vocabulary):
            raise ValueError("give at least one of `layers`, `heads`, `ffn`, `hidden`, `vocabulary`")
        return self


@register_stage
class PruneStage(Stage):
    name = "prune"
    options_model = PruneOptions
    produces_model = True
    main_process_only = True  # importance is a few calibration batches; the other processes wait

    def run(self, ctx: StageContext) -> StageResult:
        options = self.options
        model = ctx.load_model()
        random = options.selection == "random"
        rescaled = options.hidden is not None and options.hidden.norms == "rescale"
        batches = ctx.calibration_batches(options.calibration_samples, options.calibration_batch_size) \
            if (self._kinds() and not random) or rescaled else []
        scorer = _RandomChoice(self._seed(ctx.recipe), batches) if random else _Importance(options, batches)
        before = count_parameters(model)
        hidden_before = model.config.hidden_size
        removed = {kind: getattr(self, f"_prune_{kind}")(model, scorer) for kind in self._kinds()}
        model.zero_grad(set_to_none=True)
        tokenizer, vocabulary = ctx.tokenizer, None
        if options.vocabulary:
            tokenizer, vocabulary = self._prune_vocabulary(ctx, model)
        if ctx.is_main_process:
            save_pruned(model, ctx.out_dir)
            tokenizer.save_pretrained(ctx.out_dir)
        after = count_parameters(model)
        logger.info("%s: %d -> %d parameters (%.1f%% removed)", ctx.stage_id, before, after, 100 * (1 - after / before))
        return StageResult(metrics={
            "parameters_before": before,
            "parameters_after": after,
            "size_on_disk_before": size_on_disk(resolve_model_reference(ctx.model.name_or_path)),
            "size_on_disk_after": size_on_disk(ctx.out_dir),
            "removed": {kind: _counts(kind, value) for kind, value in removed.items()},
            **({"vocabulary": vocabulary} if vocabulary else {}),
            "layer_shapes": [dataclasses.asdict(shape) for shape in layer_shapes(model)],
            "hidden_size": {"before": hidden_before, "after": model.config.hidden_size},
            **({"round_to": options.round_to} if options.round_to else {}),
            "loader": "transformers (trust_remote_code=True)" if needs_structure_record(model) else "transformers",
            "selection": options.selection,
        })

    def _prune_vocabulary(self, ctx: StageContext, model):
        """Keep the tokens of the training split; measure on the test split how many tokens become unknown."""
        budget = self.options.vocabulary
        old_data, old_tokenizer = ctx.data, ctx.tokenizer
        train_ids = old_data["train"]["input_ids"]
        causal = ctx.task.type == "causal-lm"
        # Causal LM: blocks cut from one token stream hold every training token.
        counts = count_tokens(train_ids) if causal else training_token_counts(ctx.recipe, old_tokenizer)
        kept = select_vocabulary(old_tokenizer, counts, budget.min_frequency, budget.keep_top, budget.keep,
                                 model.config)
        check_training_tokens_kept(counts, kept, budget.max_training_tokens_lost)
        tokenizer = apply_vocabulary(model, old_tokenizer, kept)
        new_data = ctx.data_with_tokenizer(tokenizer)
        checked = check_same_pieces(train_ids, new_data["train"]["input_ids"], kept, contiguous=causal)
        kept_set = set(kept)
        test_ids = old_data["test"]["input_ids"]
        test_tokens = sum(len(ids) for ids in test_ids)
        metrics = {
            "tokens_before": len(old_tokenizer.get_vocab()),
            "tokens_kept": len(kept),
            "train_sequences_unchanged": checked,
            "train_sequences": len(train_ids),
            "test_tokens_pruned": sum(t not in kept_set for ids in test_ids for t in ids) / max(1, test_tokens),
            "test_unknown_rate_before": unknown_rate(test_ids, old_tokenizer),
            "test_unknown_rate_after": unknown_rate(new_data["test"]["input_ids"], tokenizer),
            "test_tokens_before": test_tokens,
            "test_tokens_after": sum(len(ids) for ids in new_data["test"]["input_ids"]),
        }
        logger.info("%s: vocabulary %d -> %d tokens; test tokens that became unknown: %s -> %s", ctx.stage_id,
                    metrics["tokens_before"], len(kept), metrics["test_unknown_rate_before"],
                    metrics["test_unknown_rate_after"])
        return tokenizer, metrics

    def plan(self, shape, planner):
        """Prune a structure-only copy with the run's own selection and surgery. Random selection is reproduced
        exactly (same seed); importance scores need the weights, so random scores stand in: the counts removed,
        and so the parameter count, are the same whenever every head (neuron, block) being chosen from costs the
        same number of parameters, which holds unless blocks of different shapes are dropped."""
        planner.require_full_precision(shape)
        model = shape.copy_model()
        with planner.checking():
            adapter_for(model)
        scorer = _RandomChoice(self._seed(planner.recipe))
        exact = shape.exact
        for kind in self._kinds():
            budget = getattr(self.options, kind)
            before = layer_shapes(model)
            key = (kind, _budget_key(kind, budget))
            with planner.checking(*key):
                removed = getattr(self, f"_prune_{kind}")(model, scorer)
            if kind == "layers":
                exact = exact and len({(s.heads, s.kv_heads, s.ffn_size) for s in before}) == 1
            elif kind in ("heads", "ffn"):
                _check_budget_met(planner, key, budget, removed, before, kind)
                # rounding each layer's width to round_to moves the total with the layers importance picks
                exact = exact and not (self.options.round_to and budget.scope == "global"
                                       and self.options.selection == "importance")
        scopes = [getattr(self.options, kind).scope for kind in ("heads", "ffn") if getattr(self.options, kind)]
        known = shape.per_layer_known and (self.options.selection == "random" or set(scopes) <= {"uniform"})
        pruned_vocabulary = shape.vocabulary_pruned
        if self.options.vocabulary:
            pruned_vocabulary = self._plan_vocabulary(model, planner)
            exact = pruned_vocabulary and exact
        return shape.changed(model, exact=exact, per_layer_known=known, vocabulary_pruned=pruned_vocabulary)

    def _plan_vocabulary(self, model, planner) -> bool:
        """Slice the vocabulary the run would keep, from the training split's token counts; without them (a causal
        LM's token blocks, data that cannot be read) the count stays an upper bound."""
        counts = planner.token_counts()
        if counts is None:
            return False
        budget = self.options.vocabulary
        with planner.checking("vocabulary", "min_frequency"):
            kept = select_vocabulary(planner.tokenizer, counts, budget.min_frequency, budget.keep_top, budget.keep,
                                     model.config)
            check_training_tokens_kept(counts, kept, budget.max_training_tokens_lost)
            slice_vocabulary(model, kept)
        return True

    def _kinds(self) -> list[str]:
        """The structural kinds, in the order they run in (the vocabulary comes after them, in `run`)."""
        return [kind for kind in ("layers", "heads", "ffn", "hidden") if getattr(self.options, kind)]

    def _seed(self, recipe) -> int:
        return recipe.seed if self.options.seed is None else self.options.seed

    def _prune_layers(self, model, scorer) -> list[int]:
        layers = select_layers(scorer.layer_scores(model), self.options.layers.drop)
        prune_layers(model, layers)
        return layers

    def _prune_heads(self, model, scorer) -> dict[int, list[int]]:
        budget = self.options.heads
        group_size = [shape.heads // shape.kv_heads for shape in layer_shapes(model)]
        adapter = adapter_for(model)
        head_size = adapter.attention(adapter.layers(model)[0]).head_size
        multiple = self._round_to // math.gcd(self._round_to, head_size)  # heads whose features fill whole blocks
        heads = select_heads(scorer.head_scores(model), budget.sparsity, budget.count, budget.scope,
                             budget.min_per_layer, group_size=group_size, group_strategy=budget.group_strategy,
                             multiple=multiple)
        prune_heads(model, heads)
        return heads

    def _prune_ffn(self, model, scorer) -> dict[int, list[int]]:
        budget = self.options.ffn
        neurons = select_ffn(scorer.ffn_scores(model), budget.sparsity, budget.count, budget.scope,
                             multiple=self._round_to)
        prune_ffn(model, neurons)
        return neurons

    def _prune_hidden(self, model, scorer) -> list[int]:
        budget = self.options.hidden
        config_multiple = hidden_size_multiple(model)
        multiple = math.lcm(self._round_to, config_multiple)
        if budget.size is not None and budget.size % multiple:
            reasons = ([f"round_to {self._round_to}"] if self._round_to > 1 else []) + (
                [f"the hidden sizes {type(model.config).__name__} accepts with these heads (multiples of "
                 f"{config_multiple})"] if config_multiple > 1 else [])
            raise HfCompressError(f"{budget.size} is not a multiple of {multiple}: {' and '.join(reasons)}")
        channels = select_hidden(scorer.hidden_scores(model), budget.size, budget.sparsity, multiple)
        corrections = norm_corrections(model, scorer.batches, channels) \
            if budget.norms == "rescale" and scorer.batches else None
        prune_hidden(model, channels, corrections)
        return channels

    @property
    def _round_to(self) -> int:
        return self.options.round_to or 1


class _Importance:
    """Measured importance on a few calibration batches."""

    def __init__(self, options: PruneOptions, batches: list[dict]):
        self.options, self.batches = options, batches

    def layer_scores(self, model) -> torch.Tensor:
        return layer_importance(model, self.batches, self.options.layers.method)

    def head_scores(self, model):
        return head_importance(model, self.batches)

    def ffn_scores(self, model):
        return ffn_importance(model, self.batches, self.options.ffn.method)

    def hidden_scores(self, model):
        return hidden_importance(model, self.batches, self.options.hidden.method)


class _RandomChoice:
    """Random scores: the same budget spent blindly, the control that measured importance must beat. `batches`
    (none in the plan) still measure the norms' statistics when hidden channels go."""

    def __init__(self, seed: int, batches: list[dict] | None = None):
        self.generator = torch.Generator().manual_seed(seed)
        self.batches = batches or []

    def layer_scores(self, model) -> torch.Tensor:
        return self._scores(len(layer_shapes(model)))

    def head_scores(self, model) -> list[torch.Tensor]:
        return [self._scores(shape.heads) for shape in layer_shapes(model)]

    def ffn_scores(self, model) -> list[torch.Tensor]:
        return [self._scores(shape.ffn_size) for shape in layer_shapes(model)]

    def hidden_scores(self, model) -> torch.Tensor:
        return self._scores(model.config.hidden_size)

    def _scores(self, size: int) -> torch.Tensor:
        return torch.rand(size, generator=self.generator)


def training_token_counts(recipe, tokenizer) -> Counter:
    """How often each token occurs in the training split's texts, tokenized whole (a word cut by truncation must
    keep all its pieces, or it would re-segment): what a vocabulary step chooses from."""
    texts = load_split_texts(recipe.task, "train", recipe.seed)
    return count_tokens(tokenizer(texts, add_special_tokens=False)["input_ids"])


def _check_budget_met(planner, key: tuple, budget, removed: dict, shapes: list, kind: str) -> None:
    """A budget that removes nothing, or asks for more than the per-layer minimum leaves, is a recipe error (the
    run would silently prune less than asked). `shapes` are the blocks before this kind was pruned."""
    if kind == "heads":
        unit_name, sizes, min_keep = "attention heads", [s.heads for s in shapes], budget.min_per_layer
        # what goes at once: a whole key/value group, or one head from every group (grouped-query attention)
        units = [s.heads // s.kv_heads if budget.group_strategy == "whole_groups" else s.kv_heads for s in shapes]
    else:
        unit_name, sizes, min_keep, units = "FFN neurons", [s.ffn_size for s in shapes], 1, [1] * len(shapes)
    total = sum(sizes)
    removable = sum((size - min_keep) // unit * unit for size, unit in zip(sizes, units) if size > min_keep)
    if budget.scope == "global":
        asked = budget.count if budget.count is not None else math.floor(budget.sparsity * total)
    else:
        asked = sum(budget.count // len(sizes) if budget.count is not None else math.floor(budget.sparsity * size)
                    for size in sizes)
    what = f"{key[-1]} {getattr(budget, key[-1])} ({budget.scope})"
    if asked // max(units) * max(units) > removable:
        planner.fail(key, f"{what} asks for {asked} of the {total} {unit_name} left, but keeping at least {min_keep} "
                          f"in each of {len(sizes)} layers lets at most {removable} go (drop layers instead)")
    if not any(removed.values()):
        grouped = " (grouped-query attention: heads go in units of " + "/".join(map(str, sorted(set(units)))) + ")" \
            if max(units) > 1 else ""
        planner.fail(key, f"{what} removes none of the {total} {unit_name}: it rounds down to nothing{grouped}")


def _budget_key(kind: str, budget) -> str:
    """The option that sets a kind's budget, for errors about it."""
    if kind == "layers":
        return "drop"
    if kind == "hidden":
        return "size" if budget.size is not None else "sparsity"
    return "sparsity" if budget.sparsity is not None else "count"


def _counts(kind: str, removed) -> object:
    if kind in ("layers", "hidden"):
        return removed if kind == "layers" else len(removed)
    return {int(layer): len(units) for layer, units in removed.items()}

