"""Distillation benchmark on the Rotten Tomatoes test split: does hfcompress's distillation earn its keep?

The split is the quickstart's (recipe seed 42, the teacher's test set); the seeds vary training only.
Three arms, same student initialisation (every other / a subset of the teacher's blocks), same steps, batch size,
learning rate and schedule, over several seeds:
  (a) labels only        - hfcompress `distill` with loss weights {ce: 1} (the teacher plays no part)
  (b) plain KD, by hand  - a hand-written loop: 0.5*CE + 0.5*T^2*KL(T=2), teacher run live every step
  (c) hfcompress default - the `distill` stage with its default options (teacher logits cached)
for a 3-layer student and a harder 2-layer one. Prints accuracy mean +- std per arm, the share of the teacher's
accuracy kept, the time of a cached distillation run vs a labels-only run, and the batch-1 speed of each student
shape against the teacher (timed together, round-robin: speed depends on the shape, not on the arm).

    python benchmarks/distill_arms.py --teacher runs/quickstart/01-finetune [--seeds 0 1 2] [--max-steps 200]

Other losses can be tried as further arms of the `distill` stage (the teacher runs live when they need its hidden
states or attentions), alone with --no-baselines:

    python benchmarks/distill_arms.py --students 2L --no-baselines --results-name distill_losses \
        --loss 'hidden_cosine={"weights": {"kl": 0.5, "ce": 0.5, "hidden_cosine": 1.0}}'

The teacher is a fine-tuned checkpoint (the quickstart's first stage). Results also go to
benchmarks/results/distill_arms.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from common import ROOT, paired_speed_lines, quickstart_recipe, save_results
from transformers import AutoModelForSequenceClassification, get_linear_schedule_with_warmup

import hfcompress
from hfcompress.data import batch_to_model_inputs, load_task_data
from hfcompress.distillation import student_from_layers
from hfcompress.sources import load_tokenizer
from hfcompress.recipe import parse_recipe
from hfcompress.tasks import make_task

STUDENTS = {"3L": {"num_layers": 3, "strategy": "every_other"}, "2L": {"num_layers": 2, "strategy": "uniform"}}


def training_options(args, seed: int) -> dict:
    return {"max_steps": args.max_steps, "learning_rate": args.learning_rate, "per_device_train_batch_size": 32,
            "warmup_ratio": 0.06, "eval_strategy": "no", "seed": seed}


def hfcompress_arm(args, teacher: Path, work: Path, student: str, seed: int, loss: dict | None,
                   arm: str = "default") -> dict:
    options = {**training_options(args, seed), "student": STUDENTS[student]}
    if loss is not None:
        options["loss"] = loss
    evaluate = {"evaluate": {"measure_speed": False}}
    run_dir = work / f"{student}-{seed}-{arm}"
    recipe = parse_recipe(quickstart_recipe(teacher, run_dir, [{"distill": options}, evaluate], name="distill-bench"))
    results = hfcompress.run(recipe)
    row = results.rows[-1].metrics
    return {"accuracy": row["accuracy"], "train_seconds": results.stages[0].metrics["train_seconds"]}


def plain_kd_arm(args, teacher_dir: Path, student: str, seed: int, data, task) -> dict:
    """Logit KD written out by hand: no hfcompress losses, caching or training loop."""
    torch.manual_seed(seed)
    teacher = AutoModelForSequenceClassification.from_pretrained(teacher_dir).eval()
    model, _ = student_from_layers(copy.deepcopy(teacher), **STUDENTS[student])
    model.train()
    loader = data.dataloader("train", 32, shuffle=True, seed=seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=0.01)
    schedule = get_linear_schedule_with_warmup(optimizer, int(0.06 * args.max_steps), args.max_steps)
    temperature, step, epoch = 2.0, 0, 0
    started = time.perf_counter()
    while step < args.max_steps:
        loader.batch_sampler.set_epoch(epoch)
        for batch in loader:
            inputs = batch_to_model_inputs(batch)
            labels = inputs.pop("labels")
            logits = model(**inputs).logits
            with torch.no_grad():
                teacher_logits = teacher(**inputs).logits
            kl = F.kl_div(F.log_softmax(logits / temperature, -1), F.softmax(teacher_logits / temperature, -1),
                          reduction="batchmean")
            loss = 0.5 * F.cross_entropy(logits, labels) + 0.5 * temperature**2 * kl
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad()
            step += 1
            if step >= args.max_steps:
                break
        epoch += 1
    seconds = time.perf_counter() - started
    metrics = task.evaluate(model, data.dataloader("test", 64))
    return {"accuracy": metrics["accuracy"], "train_seconds": seconds}


def teacher_row(teacher: Path, data, task) -> dict:
    model = AutoModelForSequenceClassification.from_pretrained(teacher).eval()
    return {"accuracy": task.evaluate(model, data.dataloader("test", 64))["accuracy"]}


def student_speeds(teacher_dir: Path, students: list[str], task, sequence_length: int) -> tuple[dict, list[str]]:
    """Speed depends on a student's shape, not on how it was trained: the teacher and one student of each shape,
    timed together round-robin."""
    teacher = AutoModelForSequenceClassification.from_pretrained(teacher_dir).eval()
    models = {"teacher (6 layers)": teacher}
    for student in students:
        models[f"{student} student"] = student_from_layers(copy.deepcopy(teacher), **STUDENTS[student])[0].eval()
    return paired_speed_lines(models, task, sequence_length)


def summarise(values: list[float]) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):.2f} +- {100 * spread:.2f}"


def named_loss(text: str) -> tuple[str, dict]:
    name, _, options = text.partition("=")
    try:
        return name, json.loads(options)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"--loss {name}: not JSON after '=': {error}") from None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", type=Path, default=ROOT / "runs" / "quickstart" / "01-finetune")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--students", nargs="+", default=list(STUDENTS), choices=list(STUDENTS))
    parser.add_argument("--max-steps", type=int, default=200)
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--work-dir", type=Path, default=ROOT / "runs" / "distill-bench")
    parser.add_argument("--loss", action="append", default=[], metavar="NAME=JSON", type=named_loss,
                        help="a further arm: the distill stage with these loss options (repeatable)")
    parser.add_argument("--no-baselines", action="store_true", help="run only the --loss arms")
    parser.add_argument("--results-name", default="distill_arms", help="benchmarks/results/<name>.{json,txt}")
    args = parser.parse_args()

    recipe = parse_recipe(quickstart_recipe(args.teacher, args.work_dir, [{"evaluate": {}}]))
    data = load_task_data(recipe.task, load_tokenizer(str(args.teacher)), recipe.seed)
    task = make_task(recipe.task)
    teacher = teacher_row(args.teacher, data, task)
    results = {"teacher": teacher, "settings": vars(args) | {"teacher": str(args.teacher), "work_dir": str(args.work_dir)},
               "arms": {}}
    arms = {} if args.no_baselines else {
        "(a) labels only": lambda student, seed: hfcompress_arm(args, args.teacher, args.work_dir, student, seed,
                                                                {"weights": {"ce": 1.0}}, "labels"),
        "(b) plain KD by hand": lambda student, seed: plain_kd_arm(args, args.teacher, student, seed, data, task),
        "(c) hfcompress default": lambda student, seed: hfcompress_arm(args, args.teacher, args.work_dir, student,
                                                                       seed, None),
    }
    for name, loss in args.loss:
        arms[f"distill {name}"] = lambda student, seed, name=name, loss=loss: hfcompress_arm(
            args, args.teacher, args.work_dir, student, seed, loss, name)
    for student in args.students:
        for arm, run_arm in arms.items():
            runs = [run_arm(student, seed) for seed in args.seeds]
            results["arms"][f"{student} {arm}"] = runs

    lines = [f"teacher (6 layers): test accuracy {100 * teacher['accuracy']:.2f}; test split {len(data['test'])} "
             f"reviews; {args.max_steps} steps x 32, lr {args.learning_rate}, seeds {args.seeds}",
             f"{'student / arm':36s} {'accuracy % (mean +- std)':26s} {'kept of teacher':16s} train s"]
    for name, runs in results["arms"].items():
        accuracy = [run["accuracy"] for run in runs]
        kept = 100 * statistics.mean(accuracy) / teacher["accuracy"]
        seconds = statistics.mean(run["train_seconds"] for run in runs)
        lines.append(f"{name:36s} {summarise(accuracy):26s} {kept:6.1f}%          {seconds:6.1f}")
    for student in [] if args.no_baselines else args.students:
        labels = statistics.mean(r["train_seconds"] for r in results["arms"][f"{student} (a) labels only"])
        cached = statistics.mean(r["train_seconds"] for r in results["arms"][f"{student} (c) hfcompress default"])
        lines.append(f"{student}: training time, cached distillation / labels only = {cached / labels:.2f} "
                     "(time inside the training loop; the teacher cache is built once per teacher and split)")
    results["speed"], speed_lines = student_speeds(args.teacher, args.students, task, data.task.max_length)
    report = "\n".join(lines + speed_lines)
    print(report)
    save_results(args.results_name, results, report)


if __name__ == "__main__":
    main()
