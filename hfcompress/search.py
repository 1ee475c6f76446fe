"""`hfcompress search`: say the budget (size on disk, quality kept, latency), get the model.

Cheap before expensive:
1. The teacher is fine-tuned once (the recipe's `finetune` stage, if it has one) and scored on the validation split.
2. Every combination of the search space (student depth, head and FFN sparsity, hidden size, vocabulary,
   quantization format)
   is sized by the plan (`hfcompress.plan`, shapes on the meta device, the vocabulary step with the training
   split's token counts): a candidate over the size budget is never trained.
3. Successive halving (Jamieson & Talwalkar, 2016; the inner loop of Hyperband, Li et al., 2017) over the largest
   `max_candidates` that fit: each rung trains every candidate with the same budget of distillation steps, times
   the results together with the teacher (paired, `hfcompress.comparison`), and promotes the best 1/eta by
   validation quality among those within the size and latency budget; each rung has eta times the steps of the
   one before, the last the full `num_train_epochs`.
4. The best last-rung candidate within every budget is trained again with the other `seeds`; its test quality
   is their mean. The Pareto front (size x quality x latency) is a table and a plot, the winning recipe is written
   out, and the chosen run's card says what was tried.

Every candidate is an ordinary run (its own folder, resumable) that shares the fine-tuned teacher and its cached
outputs; a search run again reuses every finished candidate and timing. Ranking uses the validation split only;
the test split is scored for the last rung alone.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

from accelerate import PartialState
from matplotlib.figure import Figure

from .card import write_model_card
from .comparison import compare_models
from .errors import HfCompressError
from .fileio import read_json, write_json, write_text
from .modeling import load_model
from .pipeline import run
from .plan import plan_recipe
from .plotting import save_figure
from .quantization import parse_variant, variant_name
from .recipe import parse_recipe
from .recipe_schema import Recipe, SearchOptions
from .run_dir import RunDir, RunResults
from .sources import load_config, load_tokenizer
from .stages.prune import training_token_counts
from .tasks import make_task

logger = logging.getLogger("hfcompress")

PLOT_FILE = "pareto.png"
WINNER_RECIPE = "recipe.yaml"
BUDGETS = ("max_size_mb", "min_quality", "max_latency_ms", "min_speedup")
# Candidates are chosen on validation quality alone: no timing, word attributions or perturbed text there.
SCORE_ONLY = {"measure_speed": False, "explanations": {"enabled": False}, "robustness": {"enabled": False}}
TIMING = {"rounds": 5, "block_calls": 10, "warmup_calls": 3, "throughput_rounds": 1, "throughput_block_calls": 1}


# ------------------------------------------------------------------------------------------------ candidates


@dataclass(frozen=True)
class Candidate:
    num_layers: int
    heads_sparsity: float
    ffn_sparsity: float
    vocabulary: int | None  # min_frequency of the vocabulary step, None: the whole vocabulary
    variant: tuple  # the quantize variant as sorted (key, value) pairs (hashable)
    hidden_size: int | None = None  # kept by the prune step; None: the student's own

    @property
    def variant_options(self) -> dict:
        return dict(self.variant)

    @property
    def format_name(self) -> str:
        return variant_name(parse_variant(self.variant_options))

    @property
    def name(self) -> str:
        vocabulary = "full" if self.vocabulary is None else f"f{self.vocabulary}"
        hidden = "" if self.hidden_size is None else f"-d{self.hidden_size}"
        return (f"L{self.num_layers}-h{round(100 * self.heads_sparsity)}-f{round(100 * self.ffn_sparsity)}{hidden}"
                f"-v{vocabulary}-{self.format_name}")

    def settings(self) -> dict:
        return {"num_layers": self.num_layers, "heads_sparsity": self.heads_sparsity,
                "ffn_sparsity": self.ffn_sparsity, "vocabulary": self.vocabulary, "quantization": self.variant_options,
                **({"hidden_size": self.hidden_size} if self.hidden_size is not None else {})}

    def stages(self, options: SearchOptions, share: float, seed: int | None = None, final: bool = False) -> list:
        """The candidate's pipeline with `share` of the last rung's training (distill, prune, recover, quantize)."""
        train = {"num_train_epochs": options.num_train_epochs * share}
        seeded = {"seed": seed} if seed is not None else {}
        stages = [{"distill": {"student": {"num_layers": self.num_layers},
                               "loss": {"weights": {"kl": 0.5, "ce": 0.5}, "temperature": 2.0},
                               "learning_rate": options.learning_rate, **train, **seeded}}]
        prune = {}
        if self.heads_sparsity:
            prune["heads"] = {"sparsity": self.heads_sparsity}
        if self.ffn_sparsity:
            prune["ffn"] = {"sparsity": self.ffn_sparsity}
        if self.hidden_size is not None:
            prune["hidden"] = {"size": self.hidden_size}
        if self.vocabulary is not None:
            prune["vocabulary"] = {"min_frequency": self.vocabulary}
        if prune:
            recovery = max(1, round(options.recovery_steps * share))
            stages += [{"prune": prune}, {"distill": {"teacher": "teacher", "learning_rate":
                                                      options.recovery_learning_rate, "max_steps": recovery,
                                                      **seeded}}]
        stages.append({"quantize": {"variants": [self.variant_options], "carry_forward": self.format_name,
                                    "evaluate": {"split": "validation", **SCORE_ONLY}}})
        if final:
            stages.append({"evaluate": {"split": "test", "measure_speed": False, "label": "test"}})
        return stages


def candidates(options: SearchOptions, teacher_layers: int) -> list[Candidate]:
    """Every combination of the space; depths the teacher does not have are left out."""
    space = options.space
    variants = [tuple(sorted(variant.items())) for variant in space.quantization]
    for variant in space.quantization:
        parse_variant(variant)  # a bad variant is a one-line error before anything runs
    depths = [depth for depth in space.num_layers if depth < teacher_layers]
    if not depths:
        raise HfCompressError(f"search.space.num_layers: the teacher has {teacher_layers} layers; give depths below it")
    return [Candidate(*values) for values in itertools.product(
        depths, space.heads_sparsity, space.ffn_sparsity, space.vocabulary, variants, space.hidden_size)]


# ------------------------------------------------------------------------------------------------ Pareto front


def pareto_front(points: list[dict], objectives: dict[str, str]) -> list[int]:
    """Indices of the points no other point dominates; `objectives` maps a key to "min" or "max". A point without a
    value for some objective is compared on the others."""
    def no_worse(a: dict, b: dict, key: str) -> bool:
        if a.get(key) is None or b.get(key) is None:
            return True
        return a[key] <= b[key] if objectives[key] == "min" else a[key] >= b[key]

    def better(a: dict, b: dict, key: str) -> bool:
        if a.get(key) is None or b.get(key) is None:
            return False
        return a[key] < b[key] if objectives[key] == "min" else a[key] > b[key]

    def dominates(a: dict, b: dict) -> bool:
        return all(no_worse(a, b, key) for key in objectives) and any(better(a, b, key) for key in objectives)

    return [i for i, point in enumerate(points)
            if not any(dominates(other, point) for j, other in enumerate(points) if j != i)]


def shortfall(point: dict, options: SearchOptions) -> float:
    """How far a point is from every budget (0: within all), as the sum of relative misses."""
    miss = 0.0
    if options.max_size_mb is not None and point.get("size_mb") is not None:
        miss += max(0.0, point["size_mb"] / options.max_size_mb - 1)
    if options.min_quality is not None and point.get("quality") is not None:
        miss += max(0.0, 1 - point["quality"] / options.min_quality)
    if options.max_latency_ms is not None and point.get("latency_ms") is not None:
        miss += max(0.0, point["latency_ms"] / options.max_latency_ms - 1)
    if options.min_speedup is not None and point.get("speedup") is not None:
        miss += max(0.0, 1 - point["speedup"] / options.min_speedup)
    return miss


# ------------------------------------------------------------------------------------------------ the search


class Search:
    def __init__(self, recipe: Recipe, options: SearchOptions, output_dir: Path, is_main_process: bool = True):
        self.recipe, self.options, self.out = recipe, options, Path(output_dir)
        self.task = make_task(recipe.task)
        self.is_main = is_main_process
        self.started = time.monotonic()
        self.candidate_of: dict[str, Candidate] = {}
        self.state: dict = {"constraints": {key: getattr(options, key) for key in (*BUDGETS, "budget_minutes")},
                            "schedule": "successive halving (Jamieson & Talwalkar 2016), eta "
                                        f"{options.eta}, at most {options.max_candidates} candidates trained",
                            "candidates": {}, "rungs": []}

    # ---------------------------------------------------------------------------- steps

    def run(self) -> dict:
        teacher = self.teacher()
        sized = self.size_candidates(teacher)
        pool = self.first_pool(sized)
        rungs = 1 + math.ceil(math.log(len(pool), self.options.eta) - 1e-9) if len(pool) > 1 else 1
        for rung in range(rungs):
            share = self.options.eta ** -(rungs - 1 - rung)
            finished = [name for name in pool if self.train(name, rung, share, final=rung == rungs - 1)]
            if not finished:
                break
            self.time_rung(rung, finished)
            pool = finished if rung == rungs - 1 else self.promote(finished, rung)
            if self.over_budget():
                logger.info("search: the time budget (%s min) is spent after rung %d", self.options.budget_minutes,
                            rung)
                break
        chosen = self.choose()
        if chosen is not None and chosen["meets"]:
            self.confirm_seeds(chosen["name"])
        return self.finish(chosen)

    def teacher(self) -> dict:
        """The fine-tuned teacher (the recipe's finetune stage, if any), scored on validation and test."""
        finetune = self.finetune_stages()
        stages = finetune + [
            {"evaluate": {"split": "validation", **SCORE_ONLY, "label": "teacher (validation)"}},
            {"evaluate": {"split": "test", "measure_speed": False, "label": "teacher"}}]
        results = self.run_recipe("teacher", stages, teacher=self.recipe.to_dict()["teacher"])
        rows = results.rows
        path = str((self.out / "teacher" / "01-finetune").resolve()) if finetune else self.recipe.teacher.name_or_path
        metric = self.task.selection_metric
        self.state["teacher"] = {"model": path, "validation": rows[0].metrics[metric], "test": rows[1].metrics[metric],
                                 "size_mb": rows[1].metrics["size_on_disk_bytes"] / 1e6, "metric": metric}
        return self.state["teacher"]

    def size_candidates(self, teacher: dict) -> list[str]:
        """Plan every candidate; the names of those within the size budget, largest first."""
        tokenizer = load_tokenizer(teacher["model"])
        counts = training_token_counts(self.recipe, tokenizer) if self.task.type == "text-classification" else None
        layers = load_config(teacher["model"]).num_hidden_layers
        fitting = []
        for candidate in candidates(self.options, layers):
            recipe = self.candidate_recipe(candidate.stages(self.options, 1.0), candidate.name)
            shape = plan_recipe(recipe, tokenizer=tokenizer, token_counts=counts)[-1].shape
            size = next(iter(shape.variant_sizes.values()), None)
            entry = {"settings": candidate.settings(), "planned_size_mb": None if size is None else size / 1e6,
                     "planned_exact": shape.exact, "rungs": {}}
            over = size is not None and self.options.max_size_mb is not None and size / 1e6 > self.options.max_size_mb
            entry["status"] = "over the size budget (planned), not trained" if over else "fits (planned)"
            self.state["candidates"][candidate.name] = entry
            self.candidate_of[candidate.name] = candidate
            if not over:
                fitting.append(candidate.name)
        self.save()
        if not fitting:
            closest = min(self.state["candidates"].items(), key=lambda item: item[1]["planned_size_mb"] or math.inf)
            raise HfCompressError(
                f"search: no candidate fits {self.options.max_size_mb} MB; the smallest is {closest[0]} at "
                f"~{closest[1]['planned_size_mb']:.1f} MB (planned): raise max_size_mb or widen search.space")
        return sorted(fitting, key=lambda name: -(self.state["candidates"][name]["planned_size_mb"] or 0))

    def first_pool(self, fitting: list[str]) -> list[str]:
        """Under a size budget the candidates that use most of it can keep the most quality: the largest that fit,
        taken in turn from each student depth and quantization format. Depth trades against width and vocabulary
        at the same size, and formats differ most in speed, which only timing shows: neither is decided by size."""
        groups: dict[tuple, list[str]] = {}
        for name in fitting:  # largest first
            candidate = self.candidate_of[name]
            groups.setdefault((candidate.num_layers, candidate.format_name), []).append(name)
        interleaved = [name for group in itertools.zip_longest(*groups.values()) for name in group if name]
        pool = interleaved[:self.options.max_candidates]
        for name in interleaved[self.options.max_candidates:]:
            self.state["candidates"][name]["status"] = "fits, not trained (smaller than the largest "\
                                                       f"{self.options.max_candidates} that fit)"
        return pool

    def train(self, name: str, rung: int, share: float, final: bool) -> bool:
        """One candidate at one rung (reused when it has already run); False when it could not run or time ran out."""
        entry = self.state["candidates"][name]
        run_dir = self.out / "candidates" / f"rung{rung}" / name
        if self.over_budget() and not RunDir(run_dir).has_results():
            entry["status"] = f"not trained at rung {rung}: time budget spent"
            return False
        candidate = self.candidate_of[name]
        try:
            results = self.run_recipe(f"candidates/rung{rung}/{name}", candidate.stages(self.options, share,
                                                                                        final=final))
        except HfCompressError as error:
            entry["status"] = f"failed at rung {rung}: {str(error).splitlines()[0]}"
            logger.warning("search: %s failed: %s", name, entry["status"])
            self.save()
            return False
        quantized = next(row for row in results.rows if row.variant)
        metrics = quantized.metrics
        record = {"share_of_training": share, "run_dir": str(run_dir), "size_mb": metrics["size_on_disk_bytes"] / 1e6,
                  "validation": metrics[self.task.selection_metric], "model_dir": quantized.model_dir}
        record["quality"] = self.quality(record["validation"], "validation")
        if final:
            record["test"] = results.rows[-1].metrics[self.task.selection_metric]
            record["test_quality"] = self.quality(record["test"], "test")
        entry["rungs"][str(rung)] = record
        entry["status"] = f"trained to rung {rung}"
        self.save()
        return True

    def time_rung(self, rung: int, names: list[str]) -> None:
        """Batch-1 latency of the rung's models and the teacher, timed together (round-robin, one process)."""
        saved = self.out / f"timing-rung{rung}.json"
        if saved.is_file() and set(read_json(saved)["models"]) >= {*names, "teacher"}:
            timed = read_json(saved)
        else:
            models = {"teacher": load_model(self.state["teacher"]["model"], self.task.model_class)}
            for name in names:
                record = self.state["candidates"][name]["rungs"][str(rung)]
                models[name] = load_model(str(Path(record["run_dir"]) / record["model_dir"]), self.task.model_class,
                                          name)
            timed = compare_models({key: model.eval() for key, model in models.items()}, self.task,
                                   self.recipe.task.max_length, reference="teacher", **TIMING)
            if self.is_main:
                write_json(saved, timed)
        for name in names:
            record = self.state["candidates"][name]["rungs"][str(rung)]
            record["latency_ms"] = timed["models"][name]["latency_ms"]
            record["speedup"] = timed["models"][name]["speedup"]
        self.state["rungs"].append({"rung": rung, "candidates": names, "teacher_latency_ms":
                                    timed["models"]["teacher"]["latency_ms"], "timing": timed["settings"]})
        self.save()

    def promote(self, names: list[str], rung: int) -> list[str]:
        """The best 1/eta by validation quality, those within the size and latency budgets first."""
        keep = max(1, math.ceil(len(names) / self.options.eta))

        def rank(name: str):
            record = self.state["candidates"][name]["rungs"][str(rung)]
            within = self.within(record, quality=False)
            return (not within, -record["quality"])

        promoted = sorted(names, key=rank)[:keep]
        for name in names:
            if name not in promoted:
                self.state["candidates"][name]["status"] = f"stopped after rung {rung} (not in the best 1/{self.options.eta})"
        return promoted

    def choose(self) -> dict | None:
        """The best candidate of the highest rung reached: within every budget, highest validation quality; else
        the closest to the budgets."""
        reached = [(name, entry, max(int(r) for r in entry["rungs"])) for name, entry in
                   self.state["candidates"].items() if entry["rungs"]]
        if not reached:
            return None
        top = max(rung for _, _, rung in reached)
        last = [(name, entry["rungs"][str(top)]) for name, entry, rung in reached if rung == top]
        meeting = [(name, record) for name, record in last if self.within(record)]
        if meeting:
            name, record = max(meeting, key=lambda item: (item[1]["quality"], -item[1]["size_mb"]))
        else:
            name, record = min(last, key=lambda item: shortfall(self.point(item[1]), self.options))
        chosen = {"name": name, "rung": top, "meets": bool(meeting), **record}
        self.state["chosen"] = chosen
        return chosen

    def confirm_seeds(self, name: str) -> None:
        """Train the chosen candidate with every seed (the first is its last-rung run) and score each on test."""
        candidate, chosen = self.candidate_of[name], self.state["chosen"]
        tests = {self.recipe.seed: chosen["test"]}  # the last rung trained with the recipe's seed
        for seed in (seed for seed in self.options.seeds if seed != self.recipe.seed):
            if self.over_budget() and not RunDir(self.out / "seeds" / f"seed{seed}").has_results():
                logger.info("search: seed %d not trained: time budget spent", seed)
                continue
            results = self.run_recipe(f"seeds/seed{seed}", candidate.stages(self.options, 1.0, seed, final=True))
            tests[seed] = results.rows[-1].metrics[self.task.selection_metric]
        chosen["test_by_seed"] = tests
        chosen["test_mean"] = sum(tests.values()) / len(tests)
        chosen["test_quality_mean"] = self.quality(chosen["test_mean"], "test")
        self.save()

    def finish(self, chosen: dict | None) -> dict:
        points = self.front_points()
        front = pareto_front(points, {"size_mb": "min", "quality": "max", "latency_ms": "min"})
        for index, point in enumerate(points):
            point["on_front"] = index in front
        self.state["front"] = [points[index] for index in front]
        self.state["points"] = points
        self.state["elapsed_minutes"] = (time.monotonic() - self.started) / 60
        if self.is_main:
            self.save()
            plot_front(points, self.state, self.out / PLOT_FILE)
            print(format_search(self.state))
            if chosen is not None:
                write_text(self.out / WINNER_RECIPE, self.winner_recipe(chosen["name"]).to_yaml())
                self.write_card(chosen)
        if chosen is None:
            raise HfCompressError("search: no candidate finished (see search.json)")
        if not chosen["meets"]:
            raise HfCompressError(
                f"search: no candidate meets every budget; the closest is {chosen['name']} "
                f"({describe_point(self.point(chosen))}); see {RunDir(self.out).search_file}")
        return self.state

    # ---------------------------------------------------------------------------- helpers

    def run_recipe(self, name: str, stages: list, teacher: str | dict | None = None) -> RunResults:
        """Run (or reuse, when it finished with the same recipe) the run OUTPUT_DIR/name."""
        run_dir = RunDir(self.out / name)
        recipe = self.candidate_recipe(stages, name.replace("/", "-"), teacher)
        if run_dir.has_results() and run_dir.recipe_file.is_file() \
                and run_dir.recipe_file.read_text(encoding="utf-8") == recipe.to_yaml():
            results = run_dir.load_results()
            if len(results.stages) == len(recipe.stages):
                logger.info("search: %s already ran, reused", name)
                return results
        logger.info("search: running %s", name)
        return run(recipe, output_dir=run_dir.path)

    def candidate_recipe(self, stages: list, name: str, teacher: str | dict | None = None) -> Recipe:
        """The recipe's task, seed and settings with these stages, from the fine-tuned teacher by default."""
        data = self.recipe.to_dict()
        for key in ("search", "output_dir"):
            data.pop(key, None)
        data.update(name=name, stages=stages, teacher=teacher or self.state["teacher"]["model"])
        return parse_recipe(data, source=f"search: {name}")

    def winner_recipe(self, name: str) -> Recipe:
        """The chosen candidate as a recipe of its own: the original teacher, its finetune stage, the candidate's
        stages at full training, a comparison and the card."""
        stages = self.finetune_stages() + self.candidate_of[name].stages(self.options, 1.0, final=True) + \
            [{"compare": {}}, {"card": {}}]
        return self.candidate_recipe(stages, f"{self.recipe.name}-{name}", self.recipe.to_dict()["teacher"])

    def finetune_stages(self) -> list[dict]:
        """The recipe's first stage when it fine-tunes the teacher (the search's starting point), else none."""
        first = self.recipe.stages[0]
        return [first.as_yaml_item()] if first.name == "finetune" else []

    def write_card(self, chosen: dict) -> None:
        """The chosen run's card, with a section on what the search tried (its search.json)."""
        run_dir = RunDir(chosen["run_dir"])
        write_json(run_dir.search_file, self.state)
        write_model_card(run_dir.path, self.out / "model_cards")

    def quality(self, value: float, split: str) -> float:
        reference = self.state["teacher"][split]
        return value / reference if self.task.greater_is_better else reference / value

    def point(self, record: dict) -> dict:
        return {key: record.get(key) for key in ("size_mb", "quality", "latency_ms", "speedup")}

    def within(self, record: dict, quality: bool = True) -> bool:
        """Within every budget (the quality budget left out when `quality` is False)."""
        point = self.point(record)
        if not quality:
            point["quality"] = None
        return shortfall(point, self.options) == 0

    def front_points(self) -> list[dict]:
        """Every trained candidate at the highest rung it reached."""
        points = []
        for name, entry in self.state["candidates"].items():
            if entry["rungs"]:
                rung = max(entry["rungs"], key=int)
                points.append({"name": name, "rung": int(rung), **self.point(entry["rungs"][rung])})
        return points

    def over_budget(self) -> bool:
        return (time.monotonic() - self.started) / 60 > self.options.budget_minutes

    def save(self) -> None:
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            write_json(RunDir(self.out).search_file, self.state)


def search(recipe: Recipe, output_dir: str | Path | None = None, **constraints) -> dict:
    """Run the search the recipe's `search:` block describes, `constraints` (max_size_mb, min_quality, ...)
    overriding it; returns the search state (also in OUTPUT_DIR/search.json)."""
    given = recipe.search.model_dump(exclude_unset=True) if recipe.search else {}
    options = SearchOptions.model_validate({**given, **{k: v for k, v in constraints.items() if v is not None}})
    if all(getattr(options, key) is None for key in BUDGETS):
        raise HfCompressError("search: give at least one budget (max_size_mb, min_quality, max_latency_ms, "
                              "min_speedup)")
    out = Path(output_dir) if output_dir is not None else recipe.resolved_output_dir
    return Search(recipe, options, out, PartialState().is_main_process).run()


# ------------------------------------------------------------------------------------------------ reporting


def describe_point(point: dict) -> str:
    parts = [f"{point['size_mb']:.1f} MB" if point.get("size_mb") is not None else "size ?",
             f"{100 * point['quality']:.1f}% of the teacher" if point.get("quality") is not None else "quality ?"]
    if point.get("latency_ms") is not None:
        parts.append(f"{point['latency_ms']:.1f} ms ({point['speedup']:.2f}x the teacher)")
    return ", ".join(parts)


def format_search(state: dict) -> str:
    teacher, constraints = state["teacher"], state["constraints"]
    budgets = ", ".join(f"{key} {value}" for key, value in constraints.items() if value is not None)
    lines = [f"search ({budgets}; {state['schedule']}): {len(state['candidates'])} candidates, "
             f"{sum(1 for e in state['candidates'].values() if e['rungs'])} trained, "
             f"{state.get('elapsed_minutes', 0):.1f} min",
             f"teacher: {teacher['size_mb']:.1f} MB, validation {teacher['metric']} {teacher['validation']:.4f}, "
             f"test {teacher['test']:.4f}",
             "candidate                              rung  size MB  quality (val)  latency ms  faster x  front"]
    for point in sorted(state["points"], key=lambda p: p["size_mb"]):
        latency = f"{point['latency_ms']:10.2f}" if point.get("latency_ms") is not None else f"{'-':>10}"
        speedup = f"{point['speedup']:8.2f}" if point.get("speedup") is not None else f"{'-':>8}"
        lines.append(f"{point['name']:<38} {point['rung']:>4}  {point['size_mb']:7.2f}  {100 * point['quality']:12.1f}%"
                     f"  {latency}  {speedup}  {'*' if point['on_front'] else ''}")
    chosen = state.get("chosen")
    if chosen:
        verdict = "meets every budget" if chosen["meets"] else "closest to the budgets (none meets them all)"
        lines.append(f"chosen: {chosen['name']} ({verdict}): {describe_point(chosen)}")
        if "test_quality_mean" in chosen:
            seeds = ", ".join(f"{seed}: {value:.4f}" for seed, value in chosen["test_by_seed"].items())
            lines.append(f"test {teacher['metric']}, mean of {len(chosen['test_by_seed'])} seed(s): "
                         f"{chosen['test_mean']:.4f} = {100 * chosen['test_quality_mean']:.1f}% of the teacher's "
                         f"({seeds})")
    lines.append("quality: the candidate's validation metric / the teacher's; latency: batch 1, timed round-robin "
                 "with the teacher in one pass per rung; * = on the Pareto front (size, quality, latency)")
    return "\n".join(lines)


def plot_front(points: list[dict], state: dict, path: Path, extra: dict | None = None) -> Path | None:
    """Size against quality for every trained candidate, the front joined, the budgets drawn; `extra` adds
    labelled reference points (e.g. the hand-written recipe's result)."""
    if not points:
        return None
    figure = Figure(figsize=(7.2, 4.6), dpi=100)
    axes = figure.add_subplot()
    axes.scatter([p["size_mb"] for p in points], [100 * p["quality"] for p in points], color="tab:gray",
                 label="candidates", zorder=2)
    front = sorted((p for p in points if p.get("on_front")), key=lambda p: p["size_mb"])
    axes.plot([p["size_mb"] for p in front], [100 * p["quality"] for p in front], "o-", color="tab:blue",
              label="Pareto front", zorder=3)
    for p in front:
        axes.annotate(p["name"], (p["size_mb"], 100 * p["quality"]), textcoords="offset points", xytext=(5, 4),
                      fontsize=7)
    for label, (size, quality) in (extra or {}).items():
        axes.scatter([size], [100 * quality], marker="s", color="tab:orange", zorder=4)
        axes.annotate(label, (size, 100 * quality), textcoords="offset points", xytext=(5, -10), fontsize=8)
    constraints = state["constraints"]
    if constraints.get("max_size_mb"):
        axes.axvline(constraints["max_size_mb"], color="tab:red", linestyle="--", linewidth=1, label="size budget")
    if constraints.get("min_quality"):
        axes.axhline(100 * constraints["min_quality"], color="tab:green", linestyle="--", linewidth=1,
                     label="quality budget")
    axes.set_xlabel("size on disk (MB)")
    axes.set_ylabel("quality kept (% of the teacher, validation)")
    axes.set_title("Search: size vs quality")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    save_figure(figure, Path(path))
    return Path(path)


def load_search(path: str | Path) -> dict:
    return read_json(RunDir(path).search_file)
