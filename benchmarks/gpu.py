"""The GPU path in one prepared script: both shipped recipes with GPU settings, and every model timed on the GPU.

    python benchmarks/gpu.py                 # on a machine with CUDA: writes benchmarks/results/gpu-*.txt
    python benchmarks/gpu.py --dry-run       # on a CPU: the same code path, tiny settings, results under /tmp
    python benchmarks/gpu.py --fsdp 2        # also each recipe sharded over 2 GPUs (torchrun, FSDP2): gpu-*-fsdp2.txt

What changes on a GPU, through `--set` overrides of the shipped recipes (printed with the results, so each run can be
repeated with `hfcompress run RECIPE --set ...`): bf16 mixed precision, larger batches, more healing steps for
SmolLM2; bitsandbytes places its 8/4-bit layers on the GPU by itself; evaluation and the `compare` stage run on the
accelerator's device. Without CUDA (and without --dry-run) it stops at once with one line. `--fsdp N` runs each recipe
again as N processes with `distributed.strategy=fsdp` (one GPU each; with --dry-run, N CPU processes over gloo) and
adds each training stage's parameter + optimizer memory per process to the table.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import torch
import yaml
from common import ROOT, RESULTS

import hfcompress
from hfcompress.recipe import load_recipe
from hfcompress.report import format_table
from hfcompress.timing import cpu_description

PACKAGES = ["torch", "transformers", "accelerate", "bitsandbytes", "optimum-quanto", "onnxruntime", "datasets"]

# Per recipe: {stage name: {option: value}}, applied to every stage of that name.
GPU_SETTINGS = {
    "quickstart": {
        "finetune": {"per_device_train_batch_size": 64, "learning_rate": 1.0e-4},
        "distill": {"per_device_train_batch_size": 64},
        "evaluate": {"per_device_eval_batch_size": 256, "timing_iterations": 100},
        "quantize": {"evaluate": {"per_device_eval_batch_size": 256, "timing_iterations": 100}},
        "compare": {"rounds": 20, "block_calls": 30, "throughput_batch_size": 256},
    },
    "smollm2-135m": {
        "distill": {"max_steps": 400, "per_device_train_batch_size": 16, "per_device_eval_batch_size": 16,
                    "eval_steps": 100},
        "evaluate": {"per_device_eval_batch_size": 16, "throughput_batch_size": 16, "timing_iterations": 50},
        "quantize": {"evaluate": {"per_device_eval_batch_size": 16, "throughput_batch_size": 16,
                                  "timing_iterations": 50}},
        "compare": {"rounds": 10, "block_calls": 15, "throughput_batch_size": 16, "throughput_rounds": 5},
    },
}
# The dry run on a CPU: the same stages, a few steps each, so the whole path runs in minutes.
DRY_RUN_SETTINGS = {
    "finetune": {"max_steps": 2},
    "distill": {"max_steps": 2, "eval_strategy": "no"},
    "evaluate": {"timing_iterations": 2, "timing_warmup": 0},
    "quantize": {"evaluate": {"timing_iterations": 2, "timing_warmup": 0}},
    "compare": {"rounds": 2, "block_calls": 2, "warmup_calls": 1, "throughput_rounds": 1, "throughput_block_calls": 1},
}


def overrides_for(recipe_path: Path, settings: dict, mixed_precision: str | None) -> list[str]:
    """`--set` strings that apply `settings` to every stage of the named kinds in the recipe."""
    stages = yaml.safe_load(recipe_path.read_text())["stages"]
    overrides = [f"mixed_precision={mixed_precision}"] if mixed_precision else []
    for index, stage in enumerate(stages):
        (name, _), = stage.items()
        for key, value in _flatten(settings.get(name, {})):
            text = json.dumps(value) if isinstance(value, str) else value  # "no" stays a string, not YAML's false
            overrides.append(f"stages.{index}.{name}.{key}={text}")
    return overrides


def _flatten(options: dict, prefix: str = ""):
    for key, value in options.items():
        if isinstance(value, dict):
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def environment_lines() -> list[str]:
    lines = [f"python {platform.python_version()}, " + ", ".join(f"{name} {_version(name)}" for name in PACKAGES)]
    if torch.cuda.is_available():
        lines.append(f"device: {torch.cuda.get_device_name(0)}, CUDA {torch.version.cuda}, "
                     f"bf16 supported: {torch.cuda.is_bf16_supported()}")
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=30)
            lines.append(f"nvidia-smi: {smi.stdout.strip()}")
        except (OSError, subprocess.TimeoutExpired):
            lines.append("nvidia-smi: not available")
    else:
        lines.append(f"device: cpu: {cpu_description()}, {torch.get_num_threads()} threads")
    return lines


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def run_recipe(name: str, output_root: Path, dry_run: bool) -> str:
    recipe_path = ROOT / "recipes" / f"{name}.yaml"
    settings = DRY_RUN_SETTINGS if dry_run else GPU_SETTINGS[name]
    overrides = overrides_for(recipe_path, settings, None if dry_run else "bf16")
    run_dir = output_root / name
    started = time.perf_counter()
    results = hfcompress.run(load_recipe(recipe_path, overrides), output_dir=run_dir)
    seconds = time.perf_counter() - started
    stage_times = ", ".join(f"{stage.id} {stage.seconds:.0f} s" for stage in results.stages)
    command = (f"hfcompress run recipes/{name}.yaml --output-dir {run_dir} "
               + " ".join(f"--set {shlex.quote(o)}" for o in overrides))
    return "\n".join([f"# {name}: {seconds:.0f} s in all ({stage_times})", f"command: {command}",
                      format_table(results), ""])


def run_recipe_sharded(name: str, output_root: Path, dry_run: bool, processes: int) -> str:
    """The recipe as `processes` FSDP processes under torchrun (the same settings plus distributed.strategy=fsdp)."""
    recipe_path = ROOT / "recipes" / f"{name}.yaml"
    settings = DRY_RUN_SETTINGS if dry_run else GPU_SETTINGS[name]
    overrides = [*overrides_for(recipe_path, settings, None if dry_run else "bf16"), "distributed.strategy=fsdp"]
    run_dir = output_root / f"{name}-fsdp{processes}"
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    command = [torchrun, "--standalone", "--nproc_per_node", str(processes), "-m", "hfcompress", "run",
               str(recipe_path), "--output-dir", str(run_dir), *[f"--set={o}" for o in overrides]]
    started = time.perf_counter()
    finished = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    seconds = time.perf_counter() - started
    if finished.returncode != 0:
        raise SystemExit(f"{name} under FSDP: exit {finished.returncode}\n{finished.stderr[-3000:]}")
    results = json.loads((run_dir / "results.json").read_text())
    memory = [f"  {stage['id']}: {stage['metrics']['distributed']}, parameters + optimizer per process "
              f"{stage['metrics']['memory_per_process']['parameter_and_optimizer_bytes'] / 1e6:.1f} MB"
              for stage in results["stages"] if "memory_per_process" in stage["metrics"]]
    return "\n".join([f"# {name}, {processes} FSDP processes: {seconds:.0f} s in all",
                      f"command: {shlex.join(command)}", format_table(results), *memory, ""])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="run the same path on a CPU with tiny settings")
    parser.add_argument("--recipes", nargs="+", default=list(GPU_SETTINGS), choices=list(GPU_SETTINGS))
    parser.add_argument("--output-dir", type=Path, help="run folders (default: runs/gpu, or /tmp for --dry-run)")
    parser.add_argument("--fsdp", type=int, default=0, metavar="N", help="also run each recipe as N FSDP processes")
    args = parser.parse_args()
    if not args.dry_run and not torch.cuda.is_available():
        print("error: benchmarks/gpu.py needs a CUDA device (torch.cuda.is_available() is False); "
              "use --dry-run to check the path on a CPU", file=sys.stderr)
        return 2
    if args.fsdp and not args.dry_run and torch.cuda.device_count() < args.fsdp:
        print(f"error: --fsdp {args.fsdp} needs {args.fsdp} GPUs (one per process); this machine has "
              f"{torch.cuda.device_count()}", file=sys.stderr)
        return 2
    output_root = args.output_dir or (Path("/tmp/hfcompress-gpu-dry-run") if args.dry_run else ROOT / "runs" / "gpu")
    header = environment_lines()
    for name in args.recipes:
        report = "\n".join([*header, "", run_recipe(name, output_root, args.dry_run)])
        print(report)
        target = (output_root if args.dry_run else RESULTS) / f"gpu-{name}.txt"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(report)
        print(f"written: {target}")
        if args.fsdp:
            sharded = "\n".join([*header, "", run_recipe_sharded(name, output_root, args.dry_run, args.fsdp)])
            print(sharded)
            target = target.with_name(f"gpu-{name}-fsdp{args.fsdp}.txt")
            target.write_text(sharded)
            print(f"written: {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
