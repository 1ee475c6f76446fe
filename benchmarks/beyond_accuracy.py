"""What compression changed besides accuracy, stage by stage, on a finished quickstart run (no training here).

    python benchmarks/beyond_accuracy.py [--run runs/quickstart]

For teacher -> student -> pruned -> final: word-attribution top-k overlap and rank correlation with the teacher,
accuracy drop under each perturbation, out-of-domain accuracy; then the issue's targets for the final model (top-3
overlap >= 0.8, each drop <= the teacher's + 1 point, out-of-domain accuracy >= 98% of the teacher's) and, where one
is missed, the stage that lost most of it. Also prints (does not save) the seconds each evaluated row spent
on these measurements: run it after a `make demo` on a quiet machine for the cost.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from common import ROOT, save_results

from hfcompress.card import load_run
from hfcompress.run_dir import AttributionComparison, Row

MIN_OVERLAP = 0.8
MAX_EXTRA_DROP = 1.0  # points over the teacher's drop
MIN_OUT_OF_DOMAIN = 0.98  # of the teacher's accuracy


def lineage(run) -> list[Row]:
    """teacher, then each plain evaluate stage's row, then the final model's row."""
    rows = [row for row in run.rows if row.variant is None]
    final = run.final_row
    return rows + ([final] if final is not None and final not in rows else [])


def summary(rows: list[Row], extra_set: str | None) -> tuple[list[str], list[list[str]]]:
    perturbations = list(dict.fromkeys(name for row in rows for name in row.robustness))
    header = ["model", "accuracy", "top-3 overlap", "rank corr", *(f"{name} drop" for name in perturbations),
              *([f"OOD acc ({extra_set})"] if extra_set else [])]
    body = []
    for row in rows:
        compared = _against_teacher(row)
        cells = [row.label, f"{row.metrics['accuracy']:.4f}",
                 *(f"{value:.3f}" if compared and value is not None else "-"
                   for value in ((compared.top_k_overlap, compared.spearman) if compared else (None, None))),
                 *(f"{row.robustness[name]['drop']:+.2f}" for name in perturbations)]
        if extra_set:
            cells.append(f"{row.extra_datasets[extra_set].metrics['accuracy']:.4f}")
        body.append(cells)
    return header, body


def _against_teacher(row: Row) -> AttributionComparison | None:
    return row.explanations.teacher if row.explanations else None


def target_lines(rows: list[Row], extra_set: str | None) -> list[str]:
    teacher, final = rows[0], rows[-1]
    lines = [f"targets for the final model ({final.label}):"]
    overlap = lambda row: _against_teacher(row).top_k_overlap if _against_teacher(row) else 1.0
    lines.append(_verdict(f"top-3 overlap {overlap(final):.3f} >= {MIN_OVERLAP}", overlap(final) >= MIN_OVERLAP,
                          _loss(rows, overlap)))
    for name, scores in final.robustness.items():
        limit = teacher.robustness[name]["drop"] + MAX_EXTRA_DROP
        lines.append(_verdict(f"{name}: drop {scores['drop']:+.2f} <= teacher's {teacher.robustness[name]['drop']:+.2f}"
                              f" + {MAX_EXTRA_DROP:.0f}", scores["drop"] <= limit,
                              _loss(rows, lambda row, name=name: -row.robustness[name]["drop"])))
    if extra_set:
        accuracy = lambda row: row.extra_datasets[extra_set].metrics["accuracy"]
        ratio = accuracy(final) / accuracy(teacher)
        lines.append(_verdict(f"out-of-domain accuracy {100 * ratio:.1f}% of the teacher's >= {100 * MIN_OUT_OF_DOMAIN:.0f}%",
                              ratio >= MIN_OUT_OF_DOMAIN, _loss(rows, accuracy)))
    return lines


def _loss(rows: list[Row], value) -> str:
    """The step between consecutive rows that lowered `value` most."""
    steps = [(value(before) - value(after), after.label) for before, after in zip(rows, rows[1:])]
    lost, label = max(steps)
    return f"most lost at {label} ({lost:+.3f})" if lost > 0 else "no stage lost any"


def _verdict(text: str, met: bool, where: str) -> str:
    return f"  {'met   ' if met else 'MISSED'} {text}" + ("" if met else f"; {where}")


def seconds_lines(run) -> list[str]:
    lines = ["seconds spent on these measurements per evaluated row (explanations, robustness, out-of-domain set):"]
    for row in run.rows:
        spent = row.beyond_accuracy_seconds
        lines.append(f"  {row.label}: " + ", ".join(f"{name} {value:.1f}" for name, value in spent.items())
                     + f" (total {sum(spent.values()):.1f})")
    stages = {stage.id: stage.seconds for stage in run.results.stages if stage.stage in ("evaluate", "quantize")}
    lines.append("  stage seconds: " + ", ".join(f"{stage} {value:.0f}" for stage, value in stages.items() if value))
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=ROOT / "runs" / "quickstart")
    args = parser.parse_args()
    run = load_run(args.run)
    rows = lineage(run)
    extra_set = next(iter(rows[0].extra_datasets), None)
    header, body = summary(rows, extra_set)
    widths = [max(len(cell) for cell in column) for column in zip(header, *body)]
    table = ["  ".join(cell.ljust(width) for cell, width in zip(cells, widths)) for cells in [header, *body]]
    device = run.results.environment.get("device", "?")
    report = "\n".join([f"{run.results.name} ({args.run.name}) on {device}", *table, *target_lines(rows, extra_set)])
    print(report)
    print("\n".join(seconds_lines(run)))  # timings: printed, not saved (meaningful on a quiet machine only)
    fields = {"label", "explanations", "robustness", "extra_datasets", "beyond_accuracy_seconds"}
    save_results("beyond_accuracy", {"rows": [row.model_dump(mode="json", include=fields) for row in run.rows]}, report)


if __name__ == "__main__":
    main()
