"""The model card of a run: valid Hub metadata and a body that says what the model is, how it was made and how good,
small and fast it is, and how to load it.

Everything comes from the run directory (results.json, recipe.yaml, the final checkpoint) and the teacher's own card.
The rendered card is scrubbed before it is returned: it never carries a Hub token or a local absolute path.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData, get_token

from .errors import HfCompressError
from .explanations import load_attributions
from .fileio import read_json, write_text
from .modeling_hfcompress import QUANTO_KEY, STRUCTURE_KEY
from .plotting import plot_size_vs_quality, plot_word_attributions
from .quantization import RECORD_FILE, QuantizationBackend, backend_for_checkpoint, read_record
from .quantization.base import is_pruned_per_layer
from .report import paired_timing, perturbation_cell
from .run_dir import Explanations, Row, RunDir, RunResults, StageRecord, TaskSummary
from .sources import local_path

CARD_FILE = "README.md"
PLOT_FILE = "size_vs_quality.png"
ATTRIBUTIONS_PLOT_FILE = "word_attributions.png"
PIPELINE_TAGS = {"text-classification": "text-classification", "causal-lm": "text-generation"}
AUTO_CLASSES = {"text-classification": "AutoModelForSequenceClassification", "causal-lm": "AutoModelForCausalLM"}
STAGE_TAGS = {"distill": "distillation", "prune": "pruned", "quantize": "quantized"}
REPO_PLACEHOLDER = "YOUR_NAMESPACE/{name}"

# A model id quoted in the loading code of a card, e.g. from_pretrained('sentence-transformers/all-MiniLM-L6-v2').
_LOADED_ID = re.compile(r"""(?:from_pretrained|SentenceTransformer|model=)\(?\s*["']([\w.-]+/[\w.-]+)["']""")
# An absolute path (POSIX, or Windows drive): not preceded by a word character, ':' or '/' so URLs are left alone.
_ABSOLUTE_PATH = re.compile(r"(?<![\w:/.~-])(?:[A-Za-z]:\\|/)(?:[\w.@+-]+[/\\])+([\w.@+-]*)")
_HUB_TOKEN = re.compile(r"hf_[A-Za-z0-9]{20,}")


# ---------------------------------------------------------------------------------------------- what a card reads


@dataclass(frozen=True)
class Teacher:
    reference: str  # as written in the recipe
    hub_id: str | None  # its id on the Hub, when known for sure
    card: ModelCard | None


@dataclass(frozen=True)
class Quantization:
    """How the final checkpoint is quantized: the backend that wrote it (with the variant's options) and its record."""

    backend: QuantizationBackend
    record: dict


@dataclass(frozen=True)
class Run:
    results: RunResults
    recipe_text: str
    final_dir: Path | None
    search: dict | None = None  # what `hfcompress search` tried before it chose this run
    run_dir: Path | None = None

    @property
    def task(self) -> TaskSummary:
        return self.results.task

    @property
    def rows(self) -> list[Row]:
        return self.results.rows

    @property
    def final_row(self) -> Row | None:
        """The evaluation of the checkpoint the run publishes (the last one, if it was evaluated twice)."""
        return self.results.final_row

    @property
    def stage_names(self) -> list[str]:
        return [stage.stage for stage in self.results.stages]

    @property
    def config(self) -> dict:
        """The final checkpoint's config.json ({} when there is none)."""
        path = self.final_dir / "config.json" if self.final_dir is not None else None
        return read_json(path) if path is not None and path.is_file() else {}

    @property
    def pruned(self) -> bool:
        """Whether the blocks differ in shape (the per-layer structure in config.json)."""
        return self.final_dir is not None and is_pruned_per_layer(self.final_dir)

    @property
    def remote_code(self) -> bool:
        """Whether the checkpoint ships its modeling code (`auto_map`): loading needs `trust_remote_code=True`."""
        return bool(self.config.get("auto_map"))

    @property
    def quantization(self) -> Quantization | None:
        return read_quantization(self.final_dir) if self.final_dir is not None else None


def load_run(run_dir: Path) -> Run:
    run = RunDir(run_dir)
    results = run.load_results()
    recipe_text = run.recipe_file.read_text(encoding="utf-8") if run.recipe_file.is_file() else ""
    final = results.final_model_dir
    return Run(results=results, recipe_text=recipe_text, final_dir=run.path / final if final else None,
               search=read_json(run.search_file) if run.search_file.is_file() else None, run_dir=run.path)


def read_quantization(folder: Path) -> Quantization | None:
    """How a checkpoint is quantized, from the quantization.json its backend wrote (None: not quantized)."""
    if not (Path(folder) / RECORD_FILE).is_file():
        return None
    return Quantization(backend=backend_for_checkpoint(folder), record=read_record(folder))


def describe_teacher(reference: str) -> Teacher:
    """The teacher's card (local folder, package folder or Hub cache) and its Hub id when it is certain."""
    try:
        folder = local_path(reference, "teacher")
    except HfCompressError:  # the teacher folder is gone since the run: the card just loses what it inherits
        return Teacher(reference=reference, hub_id=None, card=None)
    if folder is None:
        return Teacher(reference=reference, hub_id=reference, card=_load_card(reference))
    card = _load_card(str(folder / CARD_FILE)) if (folder / CARD_FILE).is_file() else None
    return Teacher(reference=reference, hub_id=_id_loaded_in(card), card=card)


def _load_card(location: str) -> ModelCard | None:
    """A local README.md, or a Hub model's card (from the cache when offline); None when it cannot be had."""
    try:
        return ModelCard.load(location, ignore_metadata_errors=True)
    except (OSError, ValueError):  # huggingface_hub's HTTP, offline and not-found errors are all OSErrors
        return None


def _id_loaded_in(card: ModelCard | None) -> str | None:
    """The Hub id a local copy's card loads itself by, e.g. a package that ships sentence-transformers/all-MiniLM-L6-v2.

    Only a single unambiguous id counts; config.json's `_name_or_path` is not used because it often names the model
    the teacher was trained *from* (all-MiniLM-L6-v2 says nreimers/MiniLM-L6-H384-uncased), not the teacher itself.
    """
    if card is None:
        return None
    placeholder = REPO_PLACEHOLDER.split("/")[0]  # an hfcompress card written before its repo id was known
    ids = {model_id for model_id in _LOADED_ID.findall(card.text) if not model_id.startswith(placeholder)}
    return ids.pop() if len(ids) == 1 else None


# ---------------------------------------------------------------------------------------------- metadata


def card_metadata(run: Run, teacher: Teacher, repo_id: str | None) -> ModelCardData:
    task = run.task
    teacher_data = teacher.card.data if teacher.card is not None else None
    relation = {"base_model_relation": base_model_relation(run)} if teacher.hub_id else {}
    eval_results = evaluation_results(run)
    return ModelCardData(
        language=task.language,
        license=getattr(teacher_data, "license", None),
        license_name=getattr(teacher_data, "license_name", None),
        license_link=getattr(teacher_data, "license_link", None),
        library_name="transformers",
        pipeline_tag=PIPELINE_TAGS[task.type],
        base_model=teacher.hub_id,
        datasets=[task.dataset_id] if task.dataset_id else None,
        metrics=task.metrics or None,
        tags=card_tags(run),
        model_name=model_name(run, repo_id),
        eval_results=eval_results or None,
        **relation,
    )


def base_model_relation(run: Run) -> str:
    """The Hub's relation to `base_model`: "quantized" only if quantization was the one change to the weights.

    A model that was also fine-tuned, distilled or pruned is no longer the teacher's weights, so it is a "finetune".
    """
    producing = [stage.stage for stage in run.results.stages if stage.produces_model]
    return "quantized" if producing and set(producing) == {"quantize"} else "finetune"


def card_tags(run: Run) -> list[str]:
    tags = ["hfcompress"]
    tags += [STAGE_TAGS[name] for name in dict.fromkeys(run.stage_names) if name in STAGE_TAGS]
    if run.remote_code:
        tags.append("custom_code")  # the Hub's tag for repos that ship modeling code
    quantization = run.quantization
    if quantization is not None:
        if quantization.backend.bits is not None:
            tags.append(f"{quantization.backend.bits}-bit")
        if quantization.backend.hub_tag:
            tags.append(quantization.backend.hub_tag)
    return tags


def model_name(run: Run, repo_id: str | None) -> str:
    return repo_id.split("/")[-1] if repo_id else run.results.name


def evaluation_results(run: Run) -> list[EvalResult]:
    """The final model's test metrics as model-index entries."""
    row = run.final_row
    if row is None:
        return []
    task = run.task
    return [
        EvalResult(
            task_type=PIPELINE_TAGS[task.type],
            dataset_type=task.dataset_id or task.dataset,
            dataset_name=task.dataset_id or task.dataset,
            dataset_split=row.metrics.get("split", "test"),
            metric_type=metric,
            metric_value=row.metrics[metric],
        )
        for metric in task.metrics
        if row.metrics.get(metric) is not None
    ]


# ---------------------------------------------------------------------------------------------- body


def card_body(run: Run, teacher: Teacher, repo_id: str | None, plot_file: str | None) -> str:
    sections = [
        _introduction(run, teacher, repo_id),
        _lineage(run, teacher),
        _results(run, plot_file),
        _fidelity(run),
        _beyond_accuracy(run, plot_file),
        _generations(run),
        _usage(run, repo_id),
        _search(run),
        _recipe(run),
        _environment(run),
        _limitations(run, teacher),
    ]
    return "\n\n".join(section for section in sections if section) + "\n"


def _introduction(run: Run, teacher: Teacher, repo_id: str | None) -> str:
    task = run.task
    origin = f"`{teacher.hub_id}`" if teacher.hub_id else f"`{teacher.reference}`"
    lines = [
        f"# {model_name(run, repo_id)}",
        "",
        f"A compressed {task.type} model made from {origin} by the hfcompress recipe `{run.results.name}` "
        f"({' → '.join(run.stage_names)}), evaluated on {task.dataset}.",
    ]
    headline = _headline(run)
    if headline:
        lines += ["", headline]
    return "\n".join(lines)


def _headline(run: Run) -> str | None:
    final, reference = run.final_row, run.rows[0] if run.rows else None
    if final is None or reference is None or final is reference:
        return None
    metric = _quality_metrics(run)[0]
    parts = []
    size, reference_size = final.metrics.get("size_on_disk_bytes"), reference.metrics.get("size_on_disk_bytes")
    if size and reference_size:
        parts.append(f"{reference_size / size:.2f}× smaller on disk than `{reference.label}`")
    if final.metrics.get(metric) is not None and reference.metrics.get(metric) is not None:
        parts.append(f"{metric} {_format_metric(metric, final.metrics[metric])} "
                     f"(vs {_format_metric(metric, reference.metrics[metric])})")
    if not parts:
        return None
    return f"**Final model:** {', '.join(parts)} on the {final.metrics.get('split', 'test')} split."


def _lineage(run: Run, teacher: Teacher) -> str:
    lines = ["## How it was made", ""]
    is_local_copy = teacher.hub_id and teacher.hub_id != teacher.reference
    known_as = f" (a local copy of `{teacher.hub_id}`)" if is_local_copy else ""
    lines.append(f"- teacher: `{teacher.reference}`{known_as}")
    for stage in run.results.stages:
        produced = ", produced a model" if stage.produces_model else ""
        options = json.dumps({k: v for k, v in stage.options.items() if v is not None}, sort_keys=True)
        lines.append(f"- `{stage.id}` **{stage.stage}**{produced}, {stage.seconds:.0f} s: `{options}`")
        lines += _hidden_size_change(stage)
    if run.results.final_model_dir:
        lines += ["", f"This repository holds the checkpoint of `{run.results.final_model_dir}`."]
    return "\n".join(lines)


def _hidden_size_change(stage: StageRecord) -> list[str]:
    """A line under a prune stage that narrowed the residual stream."""
    hidden = stage.metrics.get("hidden_size") or {}
    if hidden.get("before") in (None, hidden.get("after")):
        return []
    return [f"  - hidden size (the residual width) {hidden['before']} → {hidden['after']}: every embedding table, "
            "projection, norm and the task head are narrower"]


def _quality_metrics(run: Run) -> list[str]:
    return list(run.task.metrics or ["accuracy"])


def _results(run: Run, plot_file: str | None) -> str | None:
    if not run.rows:
        return None
    metrics = _quality_metrics(run)
    reference = run.rows[0].metrics
    comparison = run.results.latest_comparison()
    speed_header, speed_cells, speed_note = _paired_speed(run, comparison) if comparison else _stage_speed(run)
    header = ["model", "checkpoint", "parameters", "size on disk", *metrics, *speed_header]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in run.rows:
        m = row.metrics
        cells = [
            f"`{row.label}`",
            f"`{row.model_dir}`" if row.model_dir else "–",
            _cell(m.get("num_parameters"), reference.get("num_parameters"), lambda v: f"{v / 1e6:.2f} M"),
            _cell(m.get("size_on_disk_bytes"), reference.get("size_on_disk_bytes"), lambda v: f"{v / 1e6:.1f} MB"),
            *(_cell(m.get(name), reference.get(name), lambda v, name=name: _format_metric(name, v))
              for name in metrics),
            *speed_cells(row),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    examples = reference.get("num_examples") or run.task.test_split_size
    lines += [
        "",
        f"Ratios in parentheses are against the first row. Quality on the {reference.get('split', 'test')} split"
        + (f" ({examples} examples)" if examples else "") + f"; {speed_note}",
    ]
    if plot_file:
        versus = f"{metrics[0]} and versus batch-1 speed-up" if comparison else metrics[0]
        lines += ["", f"![Size on disk versus {versus} for every evaluated model]({plot_file})"]
    return "## Results\n\n" + "\n".join(lines)


def _paired_speed(run: Run, comparison: dict):
    """Speed columns from the run's comparison pass: every model timed together, round-robin."""
    settings = comparison["settings"]
    reference = comparison["models"][settings["reference"]]

    def cells(row: Row) -> list[str]:
        timed = paired_timing(comparison, row.label)
        if timed is None:
            return ["–", "–"]
        spread = f"{timed['speedup_q1']:.2f}–{timed['speedup_q3']:.2f}"
        return [f"{timed['latency_ms']:.1f} ms ({timed['speedup']:.2f}× faster, IQR {spread})",
                _cell(timed["throughput_per_s"], reference["throughput_per_s"], lambda v: f"{v:.1f}")]

    device = run.results.environment.get("device", "the run's machine")
    note = (f"speed measured on {device} with every model loaded in one process and timed round-robin "
            f"({settings['rounds']} rounds; latency: median of the block medians at batch 1, ratios paired per "
            f"round against `{settings['reference']}`, with their interquartile range; throughput at batch "
            f"{settings['throughput_batch_size']}; {settings['sequence_length']} tokens per input).")
    return ["latency, batch 1", f"throughput ({settings['throughput_unit']})"], cells, note


def _stage_speed(run: Run):
    """Speed columns from each evaluate stage (timed minutes apart: the card says so)."""
    reference = run.rows[0].metrics

    def cells(row: Row) -> list[str]:
        m = row.metrics
        return [_cell(m.get("latency_ms_p50"), reference.get("latency_ms_p50"), lambda v: f"{v:.1f} ms"),
                _cell(m.get("throughput_per_s"), reference.get("throughput_per_s"), lambda v: f"{v:.1f}")]

    device = run.results.environment.get("device", "the run's machine")
    note = (f"latency (median, batch 1) and throughput measured on {device}, each model in its own stage: on a "
            "shared machine such timings taken minutes apart can differ by tens of percent.")
    return ["latency p50", f"throughput ({reference.get('throughput_unit', '/s')})"], cells, note


def _fidelity(run: Run) -> str | None:
    """How far each evaluated model's outputs are from the teacher's, next to its quality (see hfcompress.fidelity)."""
    compared_rows = [row for row in run.rows if row.fidelity.get("teacher")]
    if not compared_rows:
        return None
    rows = [row for row in run.rows if row in compared_rows or "ece" in row.metrics]
    metric = _quality_metrics(run)[0]
    causal = "top1_agreement" in compared_rows[0].fidelity["teacher"]
    header = ["model", metric, "top-1 token agreement" if causal else "agreement", "KL (nats)",
              *([] if causal else ["right → wrong", "wrong → right"]), "ECE"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        compared, m = row.fidelity.get("teacher"), row.metrics
        if compared is None:  # the teacher itself
            compared_cells = ["–"] * (2 if causal else 4)
        else:
            compared_cells = [f"{100 * compared['top1_agreement' if causal else 'agreement']:.1f}%", f"{compared['kl']:.4f}",
                              *([] if causal else [str(compared["right_to_wrong"]), str(compared["wrong_to_right"])])]
        cells = [f"`{row.label}`", _format_metric(metric, m[metric]) if m.get(metric) is not None else "–",
                 *compared_cells, f"{m['ece']:.3f}" if m.get("ece") is not None else "–"]
        lines.append("| " + " | ".join(cells) + " |")
    teacher = compared_rows[0].fidelity["teacher"]["label"]
    final = run.final_row if run.final_row in compared_rows else compared_rows[-1]
    kl_over = final.fidelity["teacher"].get("kl_over")
    lines += ["", f"Against `{teacher}` on the {final.metrics.get('split', 'test')} split: agreement is the share "
              f"of {'token positions with the same most likely next token' if causal else 'examples with the same prediction'}"
              f", KL the mean KL(teacher ‖ model){f' over the {kl_over}' if kl_over else ''}"
              + ("" if causal else ", right → wrong the test examples the teacher got right and the model gets wrong")
              + f"; ECE is the expected calibration error ({final.metrics.get('ece_bins', '?')} bins)."]
    changes = final.fidelity["teacher"].get("f1_change")
    per_class = final.metrics.get("per_class_f1")
    if changes and per_class:
        listed = ", ".join(f"{name} {score:.3f} ({changes.get(name, 0):+.3f})" for name, score in per_class.items())
        lines += ["", f"F1 per class of `{final.label}` (change against `{teacher}`): {listed}."]
    return "## Fidelity to the teacher\n\n" + "\n".join(lines)


def _beyond_accuracy(run: Run, plot_file: str | None) -> str | None:
    """Explanation fidelity, robustness to perturbed text and out-of-domain quality of every model, against the
    teacher's (see hfcompress.explanations and hfcompress.robustness)."""
    rows = [row for row in run.rows if row.explanations or row.robustness or row.extra_datasets]
    if not rows:
        return None
    metric = _quality_metrics(run)[0]
    explained = next((row.explanations for row in rows if row.explanations), None)
    perturbations = list(dict.fromkeys(name for row in rows for name in row.robustness))
    extra_sets = list(dict.fromkeys(name for row in rows for name in row.extra_datasets))
    teacher = next((row for row in rows if row.label == "teacher"), rows[0])
    header = ["model", *([f"top-{explained.top_k} words shared", "rank correlation"] if explained else []),
              *(f"{name} ({metric})" for name in extra_sets), *perturbations]
    body = []
    for row in rows:
        cells = [f"`{row.label}`"]
        if explained:
            compared = row.explanations.teacher if row.explanations else None
            cells += [_optional(compared and compared.top_k_overlap, "{:.2f}"),
                      _optional(compared and compared.spearman, "{:.2f}")]
        for name in extra_sets:
            value, reference = (_extra_metric(scored, name, metric) for scored in (row, teacher))
            cells.append(_cell(value, reference, lambda v: _format_metric(metric, v)))
        cells += [perturbation_cell(row.robustness.get(name), "{change:+.1f} pts, {flipped:.1f}% flipped")
                  if name in row.robustness else "–" for name in perturbations]
        body.append(cells)
    notes = _beyond_accuracy_notes(explained, teacher.label, metric, bool(extra_sets), bool(perturbations))
    picture = _attributions_picture_link(run, plot_file)
    return "\n".join(["## What compression changed besides accuracy", "", *_markdown_table(header, body), "",
                      notes, *picture])


def _beyond_accuracy_notes(explained: Explanations | None, teacher: str, metric: str, extra_sets: bool,
                           perturbations: bool) -> str:
    notes = []
    if explained:
        notes.append(f"Word attributions: for {explained.num_examples} sampled test examples, how much removing "
                     f"each word ({explained.method}, baseline '{explained.baseline}') lowers the log-odds of "
                     f"the class `{teacher}` predicted; the share of `{teacher}`'s {explained.top_k} most important "
                     "words that the model also ranks top, and the Spearman correlation of the two rankings, "
                     "averaged over examples.")
    if extra_sets:
        notes.append(f"Out of domain: {metric} on other data of the same task, ratio to `{teacher}`'s.")
    if perturbations:
        notes.append("Perturbed test text (typos, casing, punctuation removed, words dropped ...; seeded, labels "
                     "kept): the change in accuracy from the clean test split, and the share of predictions that "
                     "flipped.")
    return " ".join(notes)


def _markdown_table(header: list[str], body: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(cells) + " |" for cells in body)]


def _optional(value, template: str) -> str:
    return "–" if value is None else template.format(value)


def _extra_metric(row: Row, name: str, metric: str) -> float | None:
    scored = row.extra_datasets.get(name)
    return scored.metrics.get(metric) if scored else None


def _attributions_picture_link(run: Run, plot_file: str | None) -> list[str]:
    if plot_file is None or attribution_examples(run) is None:
        return []
    return ["", f"![Test sentences, each word shaded by its attribution: teacher above the final model]"
                f"({ATTRIBUTIONS_PLOT_FILE})"]


def attribution_examples(run: Run) -> list[dict] | None:
    """The teacher's shown sentences with the teacher's and the final model's word attributions, for the picture."""
    teacher = next((row for row in run.rows if row.attributions_file and row.label == "teacher"), None)
    final = run.final_row
    if teacher is None or final is None or not final.attributions_file or run.run_dir is None:
        return None
    loaded = {row.label: load_attributions(run.run_dir / row.attributions_file) for row in (teacher, final)}
    names = run.task.label_names or []
    examples = []
    for shown in teacher.explanations.shown:
        spans = loaded[teacher.label]["spans"][shown.position]
        target = int(loaded[teacher.label]["target"][shown.position])
        examples.append({"title": f"towards {names[target] if target < len(names) else target} (the teacher's "
                                  f"prediction); red: for, blue: against",
                         "words": [shown.text[start:end] for start, end in spans],
                         "models": [(label, loaded[label]["attributions"][shown.position]) for label in loaded]})
    return examples or None


def _cell(value, reference, formatter) -> str:
    if value is None:
        return "–"
    text = formatter(value)
    return f"{text} ({value / reference:.2f}×)" if reference else text


def _format_metric(name: str, value: float) -> str:
    return f"{value:.2f}" if name == "perplexity" else f"{value:.4f}"


def _generations(run: Run) -> str | None:
    samples = run.results.generations
    if not samples:
        return None
    lines = ["## Sample generations", "", "The same prompts continued by the teacher and by the final model."]
    for number, sample in enumerate(samples, start=1):
        lines += ["", f"**Prompt {number}:**", _text_block(sample["prompt"])]
        lines += ["teacher:", _text_block(sample.get("teacher", ""))]
        lines += ["final model:", _text_block(sample.get("final", ""))]
    return "\n".join(lines)


def _text_block(text: str) -> str:
    return f"```text\n{text.replace('```', '` ` `')}\n```"


def _usage(run: Run, repo_id: str | None) -> str:
    """Loading code for this kind of checkpoint, with transformers (or the runtime its format is for) alone."""
    repo = repo_id or REPO_PLACEHOLDER.format(name=run.results.name)
    quantization = run.quantization
    backend, record = (quantization.backend, quantization.record) if quantization else (None, {})
    code = backend.usage_code(repo, run.task.type, record) if backend else None
    notes = backend.usage_notes(record) if backend else []
    if code is None:  # transformers' from_pretrained, with the keywords the format needs
        notes = [*_usage_notes(run), *notes]
        auto_class = AUTO_CLASSES[run.task.type]
        arguments = [f'"{repo}"', *(["trust_remote_code=True"] if run.remote_code else []),
                     *(backend.loading_arguments(record) if backend else [])]
        code = [
            f"# pip install {' '.join(['transformers', 'torch', *(backend.runtime_packages if backend else [])])}",
            f"from transformers import AutoTokenizer, {auto_class}",
            "",
            f'tokenizer = AutoTokenizer.from_pretrained("{repo}")',
            f"model = {auto_class}.from_pretrained({', '.join(arguments)})",
            "",
            *_inference_example(run.task.type),
        ]
    return "\n".join(["## How to use", "", "```python", *code, "```", *(["", *notes] if notes else [])])


def _inference_example(task_type: str) -> list[str]:
    if task_type == "causal-lm":
        return [
            'inputs = tokenizer("Once upon a time", return_tensors="pt")',
            "output = model.generate(**inputs, max_new_tokens=30, do_sample=False)",
            "print(tokenizer.decode(output[0], skip_special_tokens=True))",
        ]
    return [
        'inputs = tokenizer("A gripping, beautifully shot film.", return_tensors="pt")',
        "label_id = model(**inputs).logits.argmax(-1).item()",
        "print(model.config.id2label[label_id])",
    ]


def _usage_notes(run: Run) -> list[str]:
    """What the checkpoint's own structure asks of its loader (the format's notes come from its backend)."""
    notes = []
    if run.pruned:
        notes.append(f"Pruning left blocks of different shapes (per-layer head counts and feed-forward widths, in "
                     f"config.json `{STRUCTURE_KEY}`), which transformers' own classes cannot build.")
    if run.remote_code:
        notes.append("`trust_remote_code=True` runs `modeling_hfcompress.py` from this repository (torch and "
                     "transformers only; read it first): a subclass of the transformers model that cuts each block to "
                     "its saved shape before the weights load" + (" and restores the optimum-quanto weights"
                     if run.config.get(QUANTO_KEY) else "") + ".")
    return notes


def _search(run: Run) -> str | None:
    """What the search tried: the budgets, how many candidates each filter left, and the trained ones."""
    state = run.search
    if not state:
        return None
    budgets = ", ".join(f"`{key}` {value}" for key, value in state["constraints"].items() if value is not None)
    statuses = Counter(entry["status"].split(" (")[0].split(":")[0] for entry in state["candidates"].values())
    lines = ["## How this model was chosen", "",
             f"`hfcompress search` with {budgets} ({state['schedule']}) looked at {len(state['candidates'])} "
             "candidates (student depth, head and FFN sparsity, hidden size, vocabulary, quantization format): "
             + "; ".join(f"{count} {status}" for status, count in statuses.items()) + ".", "",
             "| candidate | training | size (MB) | quality kept (validation) | latency (ms) | on the front |",
             "|---|---|---|---|---|---|"]
    for point in sorted(state.get("points", []), key=lambda point: point["size_mb"]):
        latency = f"{point['latency_ms']:.2f}" if point.get("latency_ms") is not None else "-"
        lines.append(f"| {point['name']} | rung {point['rung']} | {point['size_mb']:.2f} | "
                     f"{100 * point['quality']:.1f}% | {latency} | {'yes' if point.get('on_front') else ''} |")
    chosen = state.get("chosen")
    if chosen:
        lines += ["", f"Chosen: **{chosen['name']}**" + (" (within every budget)." if chosen["meets"] else
                                                          " (the closest to the budgets: none met them all).")]
    return "\n".join(lines)


def _recipe(run: Run) -> str | None:
    if not run.recipe_text.strip():
        return None
    return "## Recipe\n\nThe full resolved recipe of this run:\n\n```yaml\n" + run.recipe_text.rstrip() + "\n```"


def _environment(run: Run) -> str | None:
    environment = run.results.environment
    if not environment:
        return None
    lines = [f"- {name}: {value}" for name, value in environment.items() if value is not None]
    return "## Environment\n\n" + "\n".join(lines)


def _not_evaluated(run: Run) -> list[str]:
    measured = {"robustness": any(row.robustness for row in run.rows),
                "calibration": any("ece" in row.metrics for row in run.rows),
                "bias and fairness": False,
                "out-of-domain data": any(row.extra_datasets for row in run.rows)}
    return [name for name, done in measured.items() if not done]


def _limitations(run: Run, teacher: Teacher) -> str:
    task = run.task
    language = task.language or "an unstated language"
    measured = ", ".join(_quality_metrics(run))
    lines = [
        f"- Its task data all comes from {task.dataset} ({language}); expect different results on other "
        "domains, text lengths or languages.",
        f"- Measured: {measured}, parameter count, size on disk, latency and throughput. Not evaluated: "
        f"{', '.join(_not_evaluated(run))}.",
        "- Latency and throughput depend on the hardware, thread count, batch size and sequence length; the numbers "
        "above hold for the run's machine only.",
        f"- It inherits the limitations and biases of its teacher `{teacher.hub_id or teacher.reference}`; read that "
        "model's card.",
    ]
    if task.type == "causal-lm":
        lines.append("- Perplexity measures fit to the evaluation text, not whether generations are useful, safe or "
                     "true.")
    if task.label_names:
        lines.append(f"- Labels: {', '.join(task.label_names)}.")
    if run.final_row is None:
        lines.append("- The published checkpoint itself was not evaluated in this run (no `evaluate` stage after it).")
    return "## Limitations\n\n" + "\n".join(lines)


# ---------------------------------------------------------------------------------------------- assembly


def build_model_card(run_dir: Path, repo_id: str | None = None, plot_file: str | None = PLOT_FILE) -> ModelCard:
    """The card of a finished run; `plot_file` is the relative path the size-vs-quality image is linked by."""
    return render_card(load_run(run_dir), repo_id, plot_file)


def render_card(run: Run, repo_id: str | None, plot_file: str | None) -> ModelCard:
    teacher = describe_teacher(run.results.teacher)
    metadata = card_metadata(run, teacher, repo_id)
    body = card_body(run, teacher, repo_id, plot_file)
    return ModelCard(scrub(f"---\n{metadata.to_yaml()}\n---\n\n{body}"))


def write_model_card(run_dir: Path, model_cards_dir: Path, repo_id: str | None = None) -> Path:
    """Write README.md and the plot into the final checkpoint and into `model_cards/<run name>/`; returns the latter."""
    run = load_run(run_dir)
    targets = [Path(model_cards_dir) / run.results.name]
    if run.final_dir is not None:
        targets.insert(0, run.final_dir)
    plot_written = False
    shown = attribution_examples(run)
    for folder in targets:
        folder.mkdir(parents=True, exist_ok=True)
        plot_written = plot_size_vs_quality(run.rows, _quality_metrics(run)[0], folder / PLOT_FILE,
                                            run.results.latest_comparison()) is not None
        if shown:
            plot_word_attributions(shown, folder / ATTRIBUTIONS_PLOT_FILE)
    card = render_card(run, repo_id, PLOT_FILE if plot_written else None)
    for folder in targets:
        write_text(folder / CARD_FILE, str(card))
    return targets[-1] / CARD_FILE


def scrub(text: str) -> str:
    """Replace Hub tokens and local absolute paths (which name the author's machine) in card text."""
    token = get_token()
    if token:
        text = text.replace(token, "<token>")
    text = _HUB_TOKEN.sub("<token>", text)
    return _ABSOLUTE_PATH.sub(lambda match: f"<local path>/{match.group(1)}", text)
