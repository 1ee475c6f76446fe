"""The training loop every training stage shares (finetune, distill, recovery after pruning), on `accelerate`.

AdamW with linear warm-up/decay, epochs or max steps, gradient accumulation, mixed precision through the
Accelerator, evaluation on the validation split each epoch or every N steps, the best weights kept, and the
full training state checkpointed every `save_steps` so an interrupted stage resumes where it stopped.
`TrainingHook`s run at fixed points (after every optimizer step: re-apply a mask, freeze, log, stop).
Weights are gathered on every process before the main process writes them, so a sharded model saves whole.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch
from accelerate.utils import set_seed
from pydantic import Field
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from .distributed import (
    clip_gradients,
    full_state_dict,
    load_full_state_dict,
    load_sharded_training_state,
    save_sharded_training_state,
    shard,
    shards_itself,
    training_memory,
)
from .fileio import read_json, write_json
from .stages.base import StageContext, StageOptions

logger = logging.getLogger(__name__)

LossFunction = Callable[[torch.nn.Module, dict], "tuple[torch.Tensor, dict[str, float]]"]
STATE_DIR = "training_state"
BEST_WEIGHTS = "best_weights.pt"


class TrainingOptions(StageOptions):
    """Named like transformers' TrainingArguments."""

    learning_rate: float = Field(5e-5, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    num_train_epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, ge=1, description="optimizer steps; overrides num_train_epochs")
    per_device_train_batch_size: int = Field(32, ge=1)
    per_device_eval_batch_size: int = Field(64, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    warmup_ratio: float = Field(0.06, ge=0, lt=1)
    max_grad_norm: float | None = Field(1.0, gt=0)
    eval_strategy: Literal["epoch", "steps", "no"] = "epoch"
    eval_steps: int | None = Field(None, ge=1)
    save_steps: int | None = Field(None, ge=1, description="checkpoint the training state every N steps")
    logging_steps: int = Field(50, ge=1)
    load_best_model_at_end: bool = True
    group_by_length: bool = True
    seed: int | None = None


@dataclass
class TrainingState:
    """Where training stands; saved beside accelerate's state so a resumed run continues exactly."""

    global_step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0
    best_metric: float | None = None
    best_step: int | None = None
    train_seconds: float = 0.0  # time in the training loop itself (no loading, caching, saving), across resumes
    history: list[dict] = field(default_factory=list)  # validation metrics, by step
    train_log: list[dict] = field(default_factory=list)  # training losses (mean over processes), every logging_steps
    last_losses: dict[str, float] = field(default_factory=dict)  # the last micro-batch's loss and its parts
    memory: dict[str, int] = field(default_factory=dict)  # per process, the peak between steps (distributed.py)
    should_stop: bool = False  # set by a hook: training ends after this step (on every process)


class TrainingHook:
    """Called by `train` at fixed points, on every process, with the unwrapped model (the parameters being
    trained; DTensors when the model is sharded). Override what you need; names follow transformers'
    `TrainerCallback`. Set `state.should_stop = True` to end training after the current step: one process
    asking is enough, every process stops at the same step."""

    def on_train_begin(self, state: TrainingState, model: torch.nn.Module) -> None:
        """Before the first step (also when resuming)."""

    def on_step_end(self, state: TrainingState, model: torch.nn.Module) -> None:
        """After each optimizer step (`state.global_step` counts it; `state.last_losses` has its loss)."""

    def on_evaluate(self, state: TrainingState, model: torch.nn.Module, metrics: dict[str, float]) -> None:
        """After each evaluation on the validation split."""

    def on_train_end(self, state: TrainingState, model: torch.nn.Module) -> None:
        """After the last step, before the best weights are loaded back."""


def train(
    ctx: StageContext,
    model: torch.nn.Module,
    options: TrainingOptions,
    compute_loss: LossFunction,
    extra_modules: list[torch.nn.Module] = (),
    hooks: list[TrainingHook] = (),
) -> tuple[torch.nn.Module, TrainingState]:
    """Train `model` with `compute_loss(model, batch) -> (loss, parts)`; return the unwrapped best model and state.

    `extra_modules` (e.g. distillation projections) are trained alongside and not saved with the model. `hooks`
    run after the run's own (`ctx.training_hooks`, given to `hfcompress.run`).
    """
    accelerator = ctx.accelerator
    # One accelerator serves every stage of a run: forget the models, optimizers and loaders an earlier training
    # stage prepared, or this stage's checkpoint would hold them too and a resumed run (which skips that stage)
    # would load their weights into this model.
    accelerator.free_memory()
    accelerator.gradient_accumulation_steps = options.gradient_accumulation_steps
    seed = ctx.recipe.seed if options.seed is None else options.seed
    set_seed(seed)

    train_loader = ctx.data.dataloader(
        "train", options.per_device_train_batch_size, shuffle=True, seed=seed, group_by_length=options.group_by_length
    )
    eval_loader = ctx.data.dataloader("validation", options.per_device_eval_batch_size)
    sharded = shards_itself(ctx.recipe.distributed, accelerator)
    if sharded:  # before the optimizer exists: FSDP2 replaces the parameters by their shards
        shard(model, accelerator, ctx.recipe.distributed)
    # The extra modules are called inside compute_loss, not through a DDP wrapper: they stay unwrapped (replicated),
    # on the device, and their gradients are averaged across processes by hand (see _Loop.run).
    for module in extra_modules:
        module.to(accelerator.device)
    optimizer = torch.optim.AdamW(_parameter_groups([model, *extra_modules], options.weight_decay),
                                  lr=options.learning_rate)
    if sharded:  # the model is already distributed, and its optimizer state is saved sharded, not by accelerate
        train_loader, eval_loader = accelerator.prepare(train_loader, eval_loader)
    else:
        model, optimizer, train_loader, eval_loader = accelerator.prepare(model, optimizer, train_loader, eval_loader)

    steps_per_epoch = max(1, math.ceil(len(train_loader) / options.gradient_accumulation_steps))
    total_steps = options.max_steps or math.ceil(options.num_train_epochs * steps_per_epoch)
    scheduler = accelerator.prepare(
        get_linear_schedule_with_warmup(
            optimizer,
            num_warmup_steps=int(options.warmup_ratio * total_steps) * accelerator.num_processes,
            num_training_steps=total_steps * accelerator.num_processes,
        )
    )
    loop = _Loop(ctx, model, extra_modules, optimizer, scheduler, train_loader, eval_loader, options, compute_loss,
                 [*ctx.training_hooks, *hooks], sharded)
    state = loop.run(total_steps)
    best = loop.finish(state)
    return best, state


def _parameter_groups(modules: list[torch.nn.Module], weight_decay: float) -> list[dict]:
    """No weight decay on biases and normalisation weights (1-d tensors), as BERT-style training does."""
    decay, no_decay = [], []
    for module in modules:
        for parameter in module.parameters():
            if parameter.requires_grad:
                (no_decay if parameter.ndim < 2 else decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class _MemoryProbe(TrainingHook):
    """The most parameter, gradient and optimizer memory this process held after a step (optimizer state exists
    only once the first step has been taken)."""

    def __init__(self, modules, optimizer):
        self.modules, self.optimizer = modules, optimizer

    def on_step_end(self, state: TrainingState, model: torch.nn.Module) -> None:
        now = training_memory(self.modules, self.optimizer)
        state.memory = {name: max(value, state.memory.get(name, 0)) for name, value in now.items()}


class _Loop:
    def __init__(self, ctx, model, extra_modules, optimizer, scheduler, train_loader, eval_loader, options,
                 compute_loss, hooks, sharded):
        self.ctx, self.accelerator = ctx, ctx.accelerator
        self.sharded = sharded
        self.hooks = hooks
        self.own_hooks = [_MemoryProbe([model, *extra_modules], optimizer)]
        self.model, self.extra_modules = model, extra_modules
        self.optimizer, self.scheduler = optimizer, scheduler
        self.train_loader, self.eval_loader = train_loader, eval_loader
        self.options, self.compute_loss = options, compute_loss
        self.state_dir = Path(ctx.out_dir) / STATE_DIR
        self.best_path = Path(ctx.out_dir) / BEST_WEIGHTS
        self.task = ctx.task

    def run(self, total_steps: int) -> TrainingState:
        state = self._resume()
        accelerator, options = self.accelerator, self.options
        progress = tqdm(
            total=total_steps, initial=state.global_step, desc=self.ctx.stage_id,
            disable=not accelerator.is_main_process, dynamic_ncols=True,
        )
        running: dict[str, float] = {}  # loss parts summed over the micro-batches since the last log line
        running_batches = 0
        self._call_hooks("on_train_begin", state)
        started = time.perf_counter()
        while state.global_step < total_steps and not state.should_stop:
            self.train_loader.set_epoch(state.epoch)
            batches = self.train_loader
            if state.batches_in_epoch:
                batches = accelerator.skip_first_batches(self.train_loader, state.batches_in_epoch)
            self.model.train()
            for module in self.extra_modules:
                module.train()
            for batch in batches:
                with accelerator.accumulate(self.model):
                    loss, parts = self.compute_loss(self.model, batch)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients:  # the end of an accumulation: one optimizer step
                        self._average_extra_gradients()
                        if options.max_grad_norm:
                            clip_gradients(accelerator, [self.model, *self.extra_modules], options.max_grad_norm)
                        self.optimizer.step()
                        self.scheduler.step()
                        self.optimizer.zero_grad()
                state.batches_in_epoch += 1
                running_batches += 1
                for name, value in parts.items():
                    running[name] = running.get(name, 0.0) + value
                if not accelerator.sync_gradients:
                    continue
                state.global_step += 1
                state.last_losses = parts
                self._call_hooks("on_step_end", state)
                progress.update(1)
                progress.set_postfix({k: f"{v:.4f}" for k, v in parts.items()}, refresh=False)
                if state.global_step % options.logging_steps == 0:
                    averages = self._mean_over_processes({name: total / running_batches
                                                          for name, total in running.items()})
                    state.train_log.append({"step": state.global_step, **averages})
                    logger.info("%s step %d train: %s", self.ctx.stage_id, state.global_step, averages)
                    running, running_batches = {}, 0
                if options.eval_strategy == "steps" and options.eval_steps and state.global_step % options.eval_steps == 0:
                    self._evaluate(state)
                if options.save_steps and state.global_step % options.save_steps == 0:
                    self._checkpoint(state)
                if state.global_step >= total_steps or state.should_stop:
                    break
            else:
                state.epoch += 1
                state.batches_in_epoch = 0
                if options.eval_strategy == "epoch":
                    self._evaluate(state)
        progress.close()
        state.train_seconds += time.perf_counter() - started
        if options.eval_strategy != "no" and (not state.history or state.history[-1]["step"] != state.global_step):
            self._evaluate(state)
        self._call_hooks("on_train_end", state)
        logger.info("%s trained %d steps in %.1f s", self.ctx.stage_id, state.global_step, state.train_seconds)
        return state

    def _call_hooks(self, event: str, state: TrainingState, *args) -> None:
        model = self.accelerator.unwrap_model(self.model)
        for hook in (*self.own_hooks, *self.hooks):
            getattr(hook, event)(state, model, *args)
        if self.hooks and self.accelerator.num_processes > 1:  # one process asking to stop stops them all, at once
            asked = torch.tensor([float(state.should_stop)], device=self.accelerator.device)
            state.should_stop = bool(self.accelerator.reduce(asked, reduction="sum").item() > 0)

    def _mean_over_processes(self, values: dict[str, float]) -> dict[str, float]:
        """The training losses of the whole batch (every process's share), rounded for the log."""
        if self.accelerator.num_processes > 1:
            names = sorted(values)
            tensor = torch.tensor([values[name] for name in names], device=self.accelerator.device)
            values = dict(zip(names, self.accelerator.reduce(tensor, reduction="mean").tolist()))
        return {name: round(value, 6) for name, value in values.items()}

    def _average_extra_gradients(self) -> None:
        if self.accelerator.num_processes == 1:
            return
        for module in self.extra_modules:
            for parameter in module.parameters():
                if parameter.grad is not None:
                    parameter.grad = self.accelerator.reduce(parameter.grad, reduction="mean")

    def _evaluate(self, state: TrainingState) -> None:
        metrics = self.task.evaluate(self.model, self.eval_loader, self.accelerator.gather_for_metrics)
        self.model.train()
        score = metrics[self.task.selection_metric]
        state.history.append({"step": state.global_step, "epoch": state.epoch, "validation": metrics})
        logger.info("%s step %d validation: %s", self.ctx.stage_id, state.global_step, metrics)
        if self.task.is_better(score, state.best_metric):
            state.best_metric, state.best_step = score, state.global_step
            if self.options.load_best_model_at_end:
                weights = full_state_dict(self.accelerator, self.model)  # every process: a sharded model is gathered
                if self.accelerator.is_main_process:
                    scratch = self.best_path.with_name(BEST_WEIGHTS + ".saving")
                    self.accelerator.save(weights, scratch)
                    scratch.replace(self.best_path)
        self._call_hooks("on_evaluate", state, metrics)
        self.accelerator.wait_for_everyone()

    def _checkpoint(self, state: TrainingState) -> None:
        """Save accelerate's full state (model, optimizer, scheduler, RNGs of every process) and ours, replacing the
        last one; a sharded model's weights and optimizer state are saved as each process's shard."""
        scratch = self.state_dir.with_name(STATE_DIR + ".saving")
        self.accelerator.save_state(str(scratch))
        if self.sharded:
            save_sharded_training_state(scratch, [self.model, *self.extra_modules], self.optimizer)
        if self.accelerator.is_main_process:
            write_json(scratch / "trainer_state.json", asdict(state))
            if self.best_path.is_file():  # the best weights as of this step go with the state that knows their step
                shutil.copyfile(self.best_path, scratch / BEST_WEIGHTS)
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            shutil.rmtree(self.state_dir, ignore_errors=True)
            scratch.rename(self.state_dir)
        self.accelerator.wait_for_everyone()

    def _resume(self) -> TrainingState:
        if not (self.state_dir / "trainer_state.json").is_file():
            return TrainingState()
        self.accelerator.load_state(str(self.state_dir))
        if self.sharded:
            load_sharded_training_state(self.state_dir, [self.model, *self.extra_modules], self.optimizer)
        state = TrainingState(**read_json(self.state_dir / "trainer_state.json"))
        if self.accelerator.is_main_process:  # not best weights an evaluation after this checkpoint may have written
            self.best_path.unlink(missing_ok=True)
            if (self.state_dir / BEST_WEIGHTS).is_file():
                shutil.copyfile(self.state_dir / BEST_WEIGHTS, self.best_path)
        self.accelerator.wait_for_everyone()
        logger.info("%s resuming from step %d (epoch %d)", self.ctx.stage_id, state.global_step, state.epoch)
        return state

    def finish(self, state: TrainingState) -> torch.nn.Module:
        """The unwrapped model with the best weights loaded; scratch files removed."""
        self.accelerator.wait_for_everyone()
        model = self.accelerator.unwrap_model(self.model)
        if self.options.load_best_model_at_end and self.best_path.is_file():
            load_full_state_dict(self.accelerator, model, self.best_path)
            logger.info("%s kept the best model: step %s, %s = %.4f", self.ctx.stage_id, state.best_step,
                        self.task.selection_metric, state.best_metric)
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            self.best_path.unlink(missing_ok=True)
            shutil.rmtree(self.state_dir, ignore_errors=True)
        return model
