"""Several processes: the recipe's `distributed:` block, what the main process does alone, and sharded training.

Strategies. `ddp` (the default): every process holds the whole model and accelerate averages the gradients.
`fsdp`: FSDP2 (`torch.distributed.fsdp.fully_shard`) shards every transformer block and the rest of the model over
the processes, so each one holds 1/N of the weights, gradients and optimizer state; the training state is saved
sharded (torch.distributed.checkpoint) and the weights gathered whole for `save_pretrained`. hfcompress applies
FSDP2 itself, on CPU and GPU alike (accelerate does not shard on CPU); a launch with accelerate's own FSDP config
is honoured too: on GPUs accelerate shards the model and the code below sees the same FSDP2 module. `deepspeed`:
accelerate's DeepSpeed integration (ZeRO stage 2 or 3), for GPU launches.
"""

from __future__ import annotations

import contextlib
import os
import resource
from datetime import timedelta
from pathlib import Path
from typing import Literal

import torch
import torch.distributed
import torch.distributed.checkpoint as dcp
from accelerate.utils import DeepSpeedPlugin, DistributedType, InitProcessGroupKwargs
from pydantic import BaseModel, ConfigDict, Field
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from .errors import HfCompressError

SHARDED_STATE_DIR = "sharded"  # inside a training checkpoint: each process's shard of weights and optimizer state
PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16}


class DistributedOptions(BaseModel):
    """The recipe's `distributed:` block (it matters only when the run is launched as several processes)."""

    model_config = ConfigDict(extra="forbid")

    strategy: Literal["ddp", "fsdp", "deepspeed"] = "ddp"
    reshard_after_forward: bool = Field(
        True, description="fsdp: free each block's gathered weights after its forward (ZeRO-3); false keeps them "
                          "until the backward pass (ZeRO-2-like: more memory, less communication)")
    shard_teacher: bool = Field(
        True, description="fsdp: shard the distillation teacher like the student (each process holds 1/N of it); "
                          "false: every process holds a whole copy")
    zero_stage: Literal[2, 3] = Field(2, description="deepspeed: ZeRO stage when the launch gives no DeepSpeed config")
    timeout_minutes: int = Field(
        120, ge=1, description="how long a process waits for the others, e.g. while the main process quantizes alone")


def accelerator_kwargs(options: DistributedOptions | None) -> dict:
    """What `Accelerator(...)` needs beyond the device and precision for these options."""
    options = options or DistributedOptions()
    kwargs = {"kwargs_handlers": [InitProcessGroupKwargs(timeout=timedelta(minutes=options.timeout_minutes))]}
    launched_with_deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    if options.strategy == "deepspeed" and not launched_with_deepspeed and world_size() > 1:
        kwargs["deepspeed_plugin"] = DeepSpeedPlugin(zero_stage=options.zero_stage)
    return kwargs


def world_size() -> int:
    """How many processes the launcher started (torchrun, accelerate launch, mpirun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def check_world(accelerator, options: DistributedOptions | None) -> None:
    """A launch that would silently run as something else is an error, not a run: N processes that accelerate sees
    as fewer (N independent runs, all rank 0, writing the same files), or DeepSpeed asked for and plain DDP given."""
    launched = world_size()
    if launched > 1 and accelerator.num_processes != launched:
        raise HfCompressError(
            f"launched as {launched} processes (WORLD_SIZE={launched}) but accelerate formed a world of "
            f"{accelerator.num_processes} ({accelerator.distributed_type}): every process would run alone as the main "
            "process. Launch with torchrun, or accelerate launch with a config whose distributed type matches the "
            "machine (on CPU: --cpu or MULTI_CPU; FSDP on CPU: the recipe's `distributed: {strategy: fsdp}`)")
    deepspeed = options is not None and options.strategy == "deepspeed"
    if deepspeed and launched > 1 and accelerator.distributed_type != DistributedType.DEEPSPEED:
        raise HfCompressError(
            f"distributed.strategy: deepspeed, but accelerate runs {accelerator.distributed_type} (it enables DeepSpeed "
            "only on GPUs, with the deepspeed package installed): this launch would train as DDP. Use strategy fsdp "
            "on CPU")


def shards_itself(options: DistributedOptions | None, accelerator) -> bool:
    """True when hfcompress applies FSDP2 itself: several processes, FSDP asked for (the recipe, or an accelerate
    FSDP launch config that accelerate could not carry out, as on CPU), and accelerate not sharding already."""
    asked = (options is not None and options.strategy == "fsdp") or \
        os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    return asked and accelerator.num_processes > 1 and accelerator.distributed_type != DistributedType.FSDP


def training_is_sharded(options: DistributedOptions | None, accelerator) -> bool:
    """FSDP, applied by hfcompress or by accelerate's own FSDP launch config."""
    return shards_itself(options, accelerator) or accelerator.distributed_type == DistributedType.FSDP


def strategy_name(options: DistributedOptions | None, accelerator) -> str:
    """How this run's training is distributed, for the stage record."""
    if accelerator.num_processes == 1:
        return "single process"
    if accelerator.distributed_type == DistributedType.FSDP:
        return "fsdp (accelerate)"
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return f"deepspeed (ZeRO-{accelerator.state.deepspeed_plugin.zero_stage})"
    return "fsdp" if shards_itself(options, accelerator) else "ddp"


def shard(model: torch.nn.Module, accelerator, options: DistributedOptions | None) -> torch.nn.Module:
    """FSDP2 in place: every transformer block (the classes transformers keeps whole, `_no_split_modules`, that sit
    in a ModuleList: the same units accelerate's FSDP wraps), then the rest of the model (embeddings, heads) as
    the root unit. Mixed precision follows the accelerator: weights gathered in bf16/fp16, gradients reduced in
    fp32."""
    options = options or DistributedOptions()
    param_dtype = PRECISIONS.get(accelerator.mixed_precision)
    precision = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None)
    settings = {"reshard_after_forward": options.reshard_after_forward, "mp_policy": precision}
    model.to(accelerator.device)
    for block in transformer_blocks(model):
        fully_shard(block, **settings)
    fully_shard(model, **settings)
    return model


def transformer_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    block_classes = {name for module in model.modules() for name in (getattr(module, "_no_split_modules", None) or [])}
    return [block for container in model.modules() if isinstance(container, torch.nn.ModuleList)
            for block in container if type(block).__name__ in block_classes]


# --------------------------------------------------------------------------------- weights: whole, once


def full_state_dict(accelerator, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's weights, on CPU, on the main process (other processes may get an empty dict).

    Call it on every process: a sharded model (FSDP2, whoever applied it; DeepSpeed ZeRO-3) is gathered.
    """
    if isinstance(model, FSDPModule):
        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return accelerator.get_state_dict(model)


def load_full_state_dict(accelerator, model: torch.nn.Module, path: Path) -> None:
    """Load weights saved from `full_state_dict` into `model` on every process (a sharded model takes its shards)."""
    if isinstance(model, FSDPModule):  # the main process reads the file and sends every process its shards
        weights = torch.load(path, map_location="cpu", weights_only=True) if accelerator.is_main_process else {}
        set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    else:
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))


# --------------------------------------------------------------------------- training state: sharded


def save_sharded_training_state(folder: Path, modules: list[torch.nn.Module], optimizer) -> None:
    """Each process writes its shard of the weights and optimizer state (torch.distributed.checkpoint): nothing is
    gathered, so a model too large for one process saves and resumes too. Call it on every process."""
    model_state, optimizer_state = get_state_dict(torch.nn.ModuleList(modules), optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(folder / SHARDED_STATE_DIR))


def load_sharded_training_state(folder: Path, modules: list[torch.nn.Module], optimizer) -> None:
    container = torch.nn.ModuleList(modules)
    model_state, optimizer_state = get_state_dict(container, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=str(folder / SHARDED_STATE_DIR))
    set_state_dict(container, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def clip_gradients(accelerator, modules: list[torch.nn.Module], max_norm: float) -> None:
    """Clip the gradients of all `modules` to one total norm. Sharded (DTensor) and replicated parameters (e.g. a
    distillation projection beside an FSDP student) cannot share one norm computation: their norms are combined."""
    parameters = [p for module in modules for p in module.parameters() if p.grad is not None]
    sharded = [p for p in parameters if isinstance(p, DTensor)]
    if not sharded:
        accelerator.clip_grad_norm_(parameters, max_norm)
        return
    groups = [sharded, [p for p in parameters if not isinstance(p, DTensor)]]
    norms = [torch.nn.utils.get_total_norm([p.grad for p in group]) for group in groups if group]
    norms = [norm.full_tensor() if isinstance(norm, DTensor) else norm for norm in norms]
    total = torch.linalg.vector_norm(torch.stack([norm.to(accelerator.device) for norm in norms]))
    for group in groups:
        torch.nn.utils.clip_grads_with_norm_(group, max_norm, total)


# ---------------------------------------------------------------------------------------------- memory


def local_bytes(tensors) -> int:
    """Bytes this process holds for these tensors (its own shard of a DTensor)."""
    total = 0
    for tensor in tensors:
        local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
        total += local.numel() * local.element_size()
    return total


def training_memory(modules: list[torch.nn.Module], optimizer) -> dict[str, int]:
    """What training keeps in this process between steps: parameters, their gradients and the optimizer's state
    (activations and gathered FSDP blocks come and go within a step and are not counted), and the process's peak
    resident memory so far (everything: data, teacher, activations)."""
    parameters = [p for module in modules for p in module.parameters()]
    states = [value for state in optimizer.state.values() for value in state.values() if torch.is_tensor(value)]
    memory = {"parameter_bytes": local_bytes(parameters),
              "gradient_bytes": local_bytes(p for p in parameters if p.requires_grad),
              "optimizer_state_bytes": local_bytes(states)}
    memory["parameter_and_optimizer_bytes"] = memory["parameter_bytes"] + memory["optimizer_state_bytes"]
    memory["peak_resident_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    return memory


# ------------------------------------------------------------------------------------ the main process alone


@contextlib.contextmanager
def main_process_alone(active: bool = True):
    """Run a main-process-only stage as if there were no process group.

    The other processes wait at a barrier meanwhile, so nothing in here may start a collective: libraries that
    branch on `torch.distributed.is_initialized()` (compressed-tensors broadcasts its offloading map when loading
    or compressing a model) take their single-process path instead of waiting forever for peers.
    """
    if not active:
        yield
        return
    is_initialized = torch.distributed.is_initialized
    torch.distributed.is_initialized = lambda: False
    try:
        yield
    finally:
        torch.distributed.is_initialized = is_initialized


def sharding_notes(options: DistributedOptions | None, stages: list[tuple[str, type]]) -> list[str]:
    """For `validate`: under FSDP, which stages run on the main process alone with the whole model (one line)."""
    if options is None or options.strategy != "fsdp":
        return []
    alone = [stage_id for stage_id, stage_class in stages if stage_class.main_process_only]
    if not alone:
        return []
    return [f"note: distributed.strategy fsdp: {', '.join(alone)} run on the main process alone with the whole model "
            "(not sharded: pruning importance, evaluation, quantization and GPTQ calibration, timing, cards)"]
