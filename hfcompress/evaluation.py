"""What a model costs: parameters, size on disk, memory footprint, latency and throughput at a fixed input length."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".onnx")
ONNX_EXTERNAL_DATA = ".onnx.data"  # the weights of an ONNX graph over 2 GB, beside model.onnx


def size_on_disk(folder: str | Path) -> int | None:
    """Bytes of the weight files in a checkpoint folder (None for a Hub id that is not on disk)."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    return sum(path.stat().st_size for path in folder.rglob("*")
               if path.suffix in WEIGHT_SUFFIXES or path.name.endswith(ONNX_EXTERNAL_DATA))


def count_parameters(model: torch.nn.Module) -> int | None:
    """Logical parameter count; packed 4-bit weights count as the matrix they stand for. An ONNX Runtime model
    reports the count of the model it was exported from."""
    if not isinstance(model, torch.nn.Module):
        return model.num_parameters()
    total = 0
    for parameter in model.parameters():
        quant_state = getattr(parameter, "quant_state", None)
        total += int(np.prod(quant_state.shape)) if quant_state is not None else parameter.numel()
    return total


def memory_footprint(model: torch.nn.Module) -> int:
    """Bytes of parameters and buffers in memory, quantized storage counted at its real width.

    Like transformers' `get_memory_footprint`, except for tensor subclasses that keep their data in inner tensors
    (quanto's int weights), which that counts as if they were float. An ONNX Runtime model: its initializers.
    """
    if not isinstance(model, torch.nn.Module):
        return model.get_memory_footprint()
    tensors = {id(tensor): tensor for tensor in [*model.parameters(), *model.buffers()]}  # tied weights once
    return sum(_tensor_bytes(tensor) for tensor in tensors.values())


def _tensor_bytes(tensor: torch.Tensor) -> int:
    if hasattr(tensor, "__tensor_flatten__"):
        inner_names, _ = tensor.__tensor_flatten__()
        return sum(_tensor_bytes(getattr(tensor, name)) for name in inner_names)
    return tensor.nelement() * tensor.element_size()


def model_device(model) -> torch.device:
    """Where a model's inputs go: transformers models (and runtime wrappers) say it, other modules by a parameter."""
    device = getattr(model, "device", None)
    return torch.device(device) if device is not None else next(model.parameters()).device


def place_on(model, device):
    """Move a loaded model to the device it is evaluated on (the accelerator's). Models a loader already placed
    (bitsandbytes through `device_map`) and runtime wrappers that are no torch modules stay where they are."""
    if not isinstance(model, torch.nn.Module) or getattr(model, "hf_device_map", None) is not None:
        return model
    return model.to(device)


def synthetic_batch(vocab_size: int, batch_size: int, length: int, device, seed: int = 0) -> dict[str, torch.Tensor]:
    """A fixed random batch of token ids: timing depends on shape, not content."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(100, vocab_size, (batch_size, length), generator=generator)
    return {"input_ids": input_ids.to(device), "attention_mask": torch.ones_like(input_ids).to(device)}


@torch.no_grad()
def time_forward(model, batch: dict, warmup: int, iterations: int) -> np.ndarray:
    """Wall-clock milliseconds of `iterations` forward passes after `warmup` untimed ones."""
    synchronize = torch.cuda.synchronize if batch["input_ids"].is_cuda else (lambda: None)
    for _ in range(warmup):
        model(**batch)
    timings = []
    for _ in range(iterations):
        synchronize()
        start = time.perf_counter()
        model(**batch)
        synchronize()
        timings.append((time.perf_counter() - start) * 1000)
    return np.array(timings)


def measure_speed(model, vocab_size: int, length: int, task, warmup: int = 5, iterations: int = 30,
                  throughput_batch_size: int = 32) -> dict[str, float]:
    """Batch-1 latency (p50/p95) and batch-N throughput at a fixed input length, after warm-up."""
    model.eval()
    device = model_device(model)
    single = synthetic_batch(vocab_size, 1, length, device)
    latency = time_forward(model, single, warmup, iterations)
    batch = synthetic_batch(vocab_size, throughput_batch_size, length, device)
    batch_ms = time_forward(model, batch, max(1, warmup // 2), max(3, iterations // 5))
    return {
        "latency_ms_p50": float(np.percentile(latency, 50)),
        "latency_ms_p95": float(np.percentile(latency, 95)),
        "throughput_per_s": float(task.throughput_items(batch) / (np.median(batch_ms) / 1000)),
        "throughput_unit": task.throughput_unit,
        "timing_sequence_length": length,
        "throughput_batch_size": throughput_batch_size,
        "timing_threads": torch.get_num_threads(),
        "timing_device": str(device),
    }


@torch.no_grad()
def measure_generation(model, tokenizer, prompt: str, max_new_tokens: int) -> dict:
    """A greedy completion of `prompt`, and the decode speed (ms per new token, tokens/s) after a warm-up."""
    model.eval()
    encoded = tokenizer(prompt, return_tensors="pt", return_token_type_ids=False)
    inputs = encoded.to(model_device(model))
    settings = {"do_sample": False, "pad_token_id": tokenizer.pad_token_id}
    model.generate(**inputs, max_new_tokens=2, **settings)
    start = time.perf_counter()
    output = model.generate(**inputs, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, **settings)
    seconds = time.perf_counter() - start
    new_tokens = output[0, inputs["input_ids"].shape[1] :]
    return {
        "generation_prompt": prompt,
        "generation": tokenizer.decode(new_tokens, skip_special_tokens=True),
        "generation_ms_per_token": 1000 * seconds / len(new_tokens),
        "generation_tokens_per_s": len(new_tokens) / seconds,
    }
