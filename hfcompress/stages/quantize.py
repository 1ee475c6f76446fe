"""`quantize`: several variants of the current model (any registered backend: bitsandbytes, quanto, 16-bit, ONNX
Runtime, compressed-tensors, GPTQ, GGUF), each saved and evaluated; one of them is carried forward to the next
stage (by name, or the smallest within a quality tolerance).
"""

from __future__ import annotations

import logging

from pydantic import Field, SerializeAsAny, field_validator

from ..errors import HfCompressError, first_line
from ..evaluation import place_on
from ..quantization import OptionError, QuantizationBackend, VariantOptions, backend_for, validate_variants
from ..run_dir import Row
from ..sources import resolve_model_reference
from .base import Stage, StageContext, StageOptions, StageResult, register_stage
from .evaluate import EvaluateOptions, evaluation_row

logger = logging.getLogger(__name__)


class QuantizeOptions(StageOptions):
    variants: list[SerializeAsAny[VariantOptions]] = Field(min_length=1)
    carry_forward: str | None = Field(None, description="variant name; default: the smallest within `tolerance`")
    tolerance: float = Field(0.01, ge=0, description="accuracy points lost (classification), or relative "
                                                     "perplexity increase (causal LM), still acceptable")
    calibration_samples: int = Field(128, ge=1, description="training samples for activation calibration")
    evaluate: EvaluateOptions = Field(default_factory=EvaluateOptions)

    @field_validator("variants", mode="before")
    @classmethod
    def _each_by_its_backend(cls, variants):
        return validate_variants(variants)

    @field_validator("variants")
    @classmethod
    def _distinct_names(cls, variants):
        names = [backend_for(variant).variant_name for variant in variants]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"variant names must differ (give `name:`), repeated: {', '.join(repeated)}")
        return variants

    @property
    def backends(self) -> list[QuantizationBackend]:
        return [backend_for(variant) for variant in self.variants]


@register_stage
class QuantizeStage(Stage):
    name = "quantize"
    options_model = QuantizeOptions
    produces_model = True
    main_process_only = True

    def run(self, ctx: StageContext) -> StageResult:
        options = self.options
        source = resolve_model_reference(ctx.model.name_or_path)
        reference_quality = self._input_quality(ctx)
        calibration = ctx.calibration_batches(options.calibration_samples, options.evaluate.per_device_eval_batch_size)
        rows, failed = [], {}
        for backend in options.backends:
            name = backend.variant_name
            try:
                rows.append(self._variant(ctx, source, backend, calibration))
            except (HfCompressError, RuntimeError, NotImplementedError) as error:  # this device cannot run it
                failed[name] = f"{type(error).__name__}: {first_line(error)}"
                logger.warning("%s: variant %s failed, the others go on: %s", ctx.stage_id, name, failed[name])
                continue
            logger.info("%s: %s %s", ctx.stage_id, name, _quality(ctx, rows[-1]))
        if not rows:
            raise HfCompressError(f"stages.{ctx.stage_id}: every quantization variant failed: {failed}")
        chosen = self._choose(ctx, rows, reference_quality)
        return StageResult(
            metrics={"input_" + ctx.task.selection_metric: reference_quality, "carried_forward": chosen,
                     "failed_variants": failed},
            rows=rows,
            model_subdir=chosen,
        )

    def plan(self, shape, planner):
        """Each variant checked against the model's shape (the refusals its backend would make when it runs) and
        its size estimated. Which variant goes on depends on its measured quality, unless `carry_forward` names one."""
        planner.require_full_precision(shape)
        backends = self.options.backends
        names = [backend.variant_name for backend in backends]
        if self.options.carry_forward is not None and self.options.carry_forward not in names:
            planner.fail(("carry_forward",),
                         f"no variant named {self.options.carry_forward!r} (have: {', '.join(names)})")
        for index, backend in enumerate(backends):
            try:
                backend.check(shape.model)
            except OptionError as error:
                planner.fail(("variants", index, error.option), error.problem)
            except HfCompressError as error:
                planner.fail(("variants", index), first_line(error))
        sizes = {backend.variant_name: backend.estimated_size(shape.model) for backend in backends}
        carried = self.options.carry_forward or (names[0] if len(names) == 1 else "smallest within tolerance")
        return shape.changed(quantization=carried, variant_sizes=sizes)

    def _variant(self, ctx: StageContext, source, backend: QuantizationBackend, calibration) -> Row:
        """Quantize, save and evaluate one variant; its evaluation row."""
        name = backend.variant_name
        model = backend.quantize(source, ctx.task.model_class, calibration)
        folder = ctx.out_dir / name
        backend.save(model, folder)
        ctx.tokenizer.save_pretrained(folder)
        return evaluation_row(ctx, model, folder, self.options.evaluate, f"{ctx.stage_id}/{name}", variant=name)

    def _input_quality(self, ctx: StageContext) -> float:
        """The input model's task metric on the same split the variants are scored on."""
        loader = ctx.data.dataloader(self.options.evaluate.split, self.options.evaluate.per_device_eval_batch_size)
        return ctx.task.evaluate(place_on(ctx.load_model(), ctx.accelerator.device), loader)[ctx.task.selection_metric]

    def _choose(self, ctx: StageContext, rows: list[Row], reference: float) -> str:
        names = [row.variant for row in rows]
        if self.options.carry_forward is not None:
            if self.options.carry_forward not in names:
                raise HfCompressError(
                    f"stages.{ctx.stage_id}.carry_forward: no successful variant named {self.options.carry_forward!r}"
                    f" (have: {', '.join(names)})")
            return self.options.carry_forward
        metric = ctx.task.selection_metric
        acceptable = [(row.metrics["size_on_disk_bytes"], row.variant) for row in rows
                      if _within_tolerance(ctx, row.metrics[metric], reference, self.options.tolerance)]
        if not acceptable:
            best = max if ctx.task.greater_is_better else min
            fallback = best(rows, key=lambda row: row.metrics[metric]).variant
            logger.warning("%s: no variant within tolerance %.3f; carrying forward the best one, %s",
                           ctx.stage_id, self.options.tolerance, fallback)
            return fallback
        return min(acceptable)[1]


def _within_tolerance(ctx: StageContext, value: float, reference: float, tolerance: float) -> bool:
    if ctx.task.greater_is_better:
        return value >= reference - tolerance
    return value <= reference * (1 + tolerance)


def _quality(ctx: StageContext, row: Row) -> str:
    metric = ctx.task.selection_metric
    return f"{metric} {row.metrics[metric]:.4f}, {row.metrics['size_on_disk_bytes'] / 1e6:.1f} MB"
