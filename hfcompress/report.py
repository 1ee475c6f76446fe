"""The stage-by-stage table: every evaluated model side by side, with ratios to the first (reference) row."""

from __future__ import annotations

from .run_dir import Row, RunResults

QUALITY_METRICS = ("accuracy", "f1", "perplexity")


def table_rows(results: RunResults) -> tuple[list[str], list[list[str]]]:
    rows = results.rows
    if not rows:
        return [], []
    quality = [name for name in QUALITY_METRICS if any(name in row.metrics for row in rows)]
    reference = rows[0].metrics
    comparison = results.latest_comparison()
    speed_header, speed_cells = (_paired_header, _paired_cells) if comparison else (_per_stage_header, _per_stage_cells)
    header = ["model", "params (M)", "size (MB)", "memory (MB)", *quality, *speed_header(results),
              "smaller x", *(f"{name} vs ref" for name in quality[:1])]
    body = []
    for row in rows:
        m = row.metrics
        cells = [
            row.label,
            _number(m.get("num_parameters"), 1e6, 2),
            _number(m.get("size_on_disk_bytes"), 1e6, 1),
            _number(m.get("memory_footprint_bytes"), 1e6, 1),
            *(_number(m.get(name), 1, 4 if name != "perplexity" else 2) for name in quality),
            *speed_cells(row, reference, comparison),
            _ratio(reference.get("size_on_disk_bytes"), m.get("size_on_disk_bytes")),
            *(_ratio(m.get(name), reference.get(name), percent=True) for name in quality[:1]),
        ]
        body.append(cells)
    return header, body


def _per_stage_header(results: RunResults) -> list[str]:
    unit = results.rows[0].metrics.get("throughput_unit", "/s")
    return ["p50 ms", "p95 ms", f"thru ({unit})", "faster x"]


def _per_stage_cells(row: Row, reference: dict, comparison) -> list[str]:
    m = row.metrics
    return [_number(m.get("latency_ms_p50"), 1, 1), _number(m.get("latency_ms_p95"), 1, 1),
            _number(m.get("throughput_per_s"), 1, 1), _ratio(reference.get("latency_ms_p50"), m.get("latency_ms_p50"))]


def _paired_header(results: RunResults) -> list[str]:
    unit = results.latest_comparison()["settings"].get("throughput_unit", "/s")
    return ["ms (IQR)", "faster x (IQR)", f"thru ({unit})", "thru x"]


def _paired_cells(row: Row, reference: dict, comparison: dict) -> list[str]:
    timed = paired_timing(comparison, row.label)
    if timed is None:
        return ["-"] * 4
    return [f"{timed['latency_ms']:.1f} ({timed['latency_ms_q1']:.1f}-{timed['latency_ms_q3']:.1f})",
            f"{timed['speedup']:.2f} ({timed['speedup_q1']:.2f}-{timed['speedup_q3']:.2f})",
            f"{timed['throughput_per_s']:.1f}", f"{timed['throughput_speedup']:.2f}"]


def paired_timing(comparison: dict | None, label: str) -> dict | None:
    """The comparison pass's timing of a row (rows that evaluated the same checkpoint share one)."""
    if not comparison:
        return None
    models = comparison["models"]
    return models.get(label) or models.get(comparison.get("aliases", {}).get(label))


def format_table(results: RunResults) -> str:
    header, body = table_rows(results)
    if not header:
        return f"{results.name}: no evaluated models yet (add an `evaluate` stage)"
    lines = _aligned(header, body)
    return "\n".join([f"{results.name}: {len(body)} evaluated model(s)", *lines, timing_note(results)])


def timing_note(results: RunResults) -> str:
    """How the speed columns were measured."""
    comparison = results.latest_comparison()
    if comparison:
        s = comparison["settings"]
        return (f"ratios are against {s['reference']}; speed: all models timed in one pass, round-robin: {s['rounds']} "
                f"rounds of {s['block_calls']} batch-1 calls per model ({s['warmup_calls']} warm-up calls before each "
                f"block), {s['throughput_rounds']} rounds of {s['throughput_block_calls']} batch-"
                f"{s['throughput_batch_size']} calls, {s['sequence_length']} tokens per input, on "
                f"{', '.join(s['devices'])} with {s['threads']} threads; ms = median of block medians, "
                f"IQR = interquartile range over rounds (of the per-round ratio, for x)")
    timing = results.rows[0].metrics
    return (f"ratios are against the first row; latency: batch 1, throughput: batch "
            f"{timing.get('throughput_batch_size', '?')}, {timing.get('timing_sequence_length', '?')} tokens per "
            f"input, on {timing.get('timing_device', '?')} with {timing.get('timing_threads', '?')} threads; each "
            f"model timed in its own stage (ratios of numbers taken minutes apart: add a `compare` stage)")


def _number(value, scale: float, digits: int) -> str:
    return "-" if value is None else f"{value / scale:.{digits}f}"


def _ratio(numerator, denominator, percent: bool = False) -> str:
    if not numerator or not denominator:
        return "-"
    return f"{100 * numerator / denominator:.1f}%" if percent else f"{numerator / denominator:.2f}"


# ---------------------------------------------------------------------------------------------- fidelity


def fidelity_rows(results: RunResults) -> tuple[list[str], list[list[str]]]:
    """Per evaluated model: its calibration, then agreement, KL and flips against the teacher and against the
    previous evaluated model (the one it was made from); per-class F1 with its change against the teacher."""
    rows = [row for row in results.rows if "ece" in row.metrics]
    if not rows:
        return [], []
    causal = any("top1_agreement" in compared for row in rows for compared in row.fidelity.values())
    compared_columns = ["top-1 agree", "KL"] if causal else ["agree", "KL", "r→w", "w→r"]
    header = ["model", "ECE", *(f"{name} T" for name in compared_columns),
              *(f"{name} prev" for name in compared_columns)]
    explained = any(row.explanations for row in rows)
    if explained:
        header += attribution_header(rows)
    if not causal:
        header.append("F1 per class (change vs T)")
    body = []
    for row in rows:
        fidelity = row.fidelity
        cells = [row.label, _number(row.metrics["ece"], 1, 3)]
        for role in ("teacher", "previous"):
            cells += _compared_cells(fidelity.get(role), causal)
        if explained:
            cells += attribution_cells(row)
        if not causal:
            cells.append(_per_class_cell(row.metrics.get("per_class_f1", {}), fidelity.get("teacher")))
        body.append(cells)
    return header, body


def attribution_header(rows: list[Row]) -> list[str]:
    k = next(row.explanations.top_k for row in rows if row.explanations)
    return [f"attr top-{k} T", "attr rho T"]


def attribution_cells(row: Row) -> list[str]:
    """Top-k word overlap and Spearman correlation of the row's word attributions with the teacher's."""
    compared = row.explanations.teacher if row.explanations else None
    if compared is None:
        return ["-", "-"]
    return [_number(compared.top_k_overlap, 1, 2), _number(compared.spearman, 1, 2)]


def _compared_cells(compared: dict | None, causal: bool) -> list[str]:
    if causal:
        return ["-", "-"] if compared is None else [f"{100 * compared['top1_agreement']:.1f}%", f"{compared['kl']:.4f}"]
    if compared is None:
        return ["-"] * 4
    return [f"{100 * compared['agreement']:.1f}%", f"{compared['kl']:.4f}", str(compared["right_to_wrong"]),
            str(compared["wrong_to_right"])]


def _per_class_cell(per_class: dict, against_teacher: dict | None) -> str:
    changes = (against_teacher or {}).get("f1_change", {})
    return ", ".join(f"{name} {score:.3f}" + (f" ({changes[name]:+.3f})" if name in changes else "")
                     for name, score in per_class.items())


def format_fidelity_table(results: RunResults) -> str:
    """The fidelity table, a note saying what each column is, and a few flipped examples with their text."""
    header, body = fidelity_rows(results)
    if not header:
        return ""
    rows = [row for row in results.rows if "ece" in row.metrics]
    bins = rows[0].metrics.get("ece_bins", "?")
    kl_over = next((c.get("kl_over") for row in rows for c in row.fidelity.values() if c.get("kl_over")), None)
    note = (f"on the {rows[0].metrics.get('split', 'test')} split, against T: the teacher (the row labelled "
            f"teacher, else the first) and prev: the model evaluated before this one's stage; agree: same prediction"
            f"{' (top-1 next token)' if kl_over else ''}; KL: mean KL(reference || model) in nats"
            f"{f' over the {kl_over}' if kl_over else ''}; r→w / w→r: test examples the reference got right and this "
            f"model gets wrong / the other way round; ECE: expected calibration error, {bins} equal-width bins")
    lines = [f"fidelity and calibration of {len(body)} model(s)", *_aligned(header, body), note]
    lines += [explanation_note(rows)] if any(row.explanations for row in rows) else []
    examples = _flip_examples(rows)
    if examples:
        lines += ["flipped against the teacher (a few):", *examples]
    lines += _extra_dataset_tables(rows)
    lines += robustness_lines(rows)
    return "\n".join(lines)


def explanation_note(rows: list[Row]) -> str:
    settings = next(row.explanations for row in rows if row.explanations)
    return (f"attr: word attributions ({settings.method}, words ablated by '{settings.baseline}') of the "
            f"teacher's predicted class on {settings.num_examples} sampled examples; top-{settings.top_k}: share "
            f"of the teacher's {settings.top_k} most important words among the model's, rho: Spearman rank "
            f"correlation over each example's words, both averaged over examples")


def robustness_rows(rows: list[Row]) -> tuple[list[str], list[list[str]]]:
    """Per model and perturbation: accuracy change from clean (points) and the share of predictions that flipped;
    causal LMs: the perplexity increase over the clean text."""
    rows = [row for row in rows if row.robustness]
    if not rows:
        return [], []
    names = list(dict.fromkeys(name for row in rows for name in row.robustness))
    body = [[row.label, *(perturbation_cell(row.robustness.get(name), "{change:+.1f} ({flipped:.1f}%)")
                          for name in names)] for row in rows]
    return ["model", *names], body


def perturbation_cell(scores: dict[str, float] | None, template: str) -> str:
    """One model's scores under one perturbation: `template` formats the accuracy change in points and the percentage
    of predictions that flipped; a causal LM's shows its perplexity increase."""
    if scores is None:
        return "-"
    if "increase" in scores:
        return f"ppl +{100 * scores['increase']:.1f}%"
    return template.format(change=0.0 - scores["drop"], flipped=100 * scores["flipped"])  # 0.0 - 0.0: no "-0.0"


def robustness_lines(rows: list[Row]) -> list[str]:
    header, body = robustness_rows(rows)
    if not header:
        return []
    causal = any("increase" in scores for row in rows for scores in row.robustness.values())
    title = ("robustness: perplexity of perturbed text against the clean text" if causal else
             "robustness: accuracy change under each perturbation, points (share of predictions that flipped)")
    return [title, *_aligned(header, body)]


def _extra_dataset_tables(rows: list[Row]) -> list[str]:
    """Per extra evaluation set: each model's quality, calibration and agreement with the teacher on it."""
    names = list(dict.fromkeys(name for row in rows for name in row.extra_datasets))
    lines = []
    for name in names:
        scored = [(row.label, row.extra_datasets[name]) for row in rows if name in row.extra_datasets]
        quality = [metric for metric in QUALITY_METRICS if metric in scored[0][1].metrics]
        causal = "perplexity" in quality
        header = ["model", *quality, f"{quality[0]} vs T", "ECE", "top-1 agree T" if causal else "agree T", "KL T"]
        teacher = next((entry for label, entry in scored if label == "teacher"), scored[0][1]).metrics
        body = []
        for label, entry in scored:
            m = entry.metrics
            cells = [label, *(_number(m.get(metric), 1, 2 if metric == "perplexity" else 4) for metric in quality),
                     _ratio(m.get(quality[0]), teacher.get(quality[0]), percent=True), _number(m.get("ece"), 1, 3)]
            body.append(cells + _compared_cells(entry.fidelity.get("teacher"), causal)[:2])
        lines += [f"extra evaluation set {name} ({scored[0][1].metrics.get('num_examples', '?')} examples):",
                  *_aligned(header, body)]
    return lines


def _aligned(header: list[str], body: list[list[str]]) -> list[str]:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *body)]
    return [
        "  ".join(str(cell).ljust(width) for cell, width in zip(header, widths)),
        "  ".join("-" * width for width in widths),
        *("  ".join(str(cell).ljust(width) for cell, width in zip(cells, widths)) for cells in body),
    ]


def _flip_examples(rows: list[Row], per_model: int = 2) -> list[str]:
    lines = []
    for row in rows:
        examples = row.fidelity.get("teacher", {}).get("examples", [])
        for direction in ("right_to_wrong", "wrong_to_right"):
            for example in [e for e in examples if e["flip"] == direction][:per_model]:
                lines.append(f"  {row.label}: {direction.replace('_to_', '→')}: {example['text']!r} "
                             f"(label {example['label']}, teacher {example['reference']}, "
                             f"this model {example['prediction']})")
    return lines
