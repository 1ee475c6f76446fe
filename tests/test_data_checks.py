"""Dirty data of the kind users have: every problem is a one-line message naming the file, column and values, or a
counted drop; never a traceback. `hfcompress validate` checks the teacher and the data without training."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from hfcompress import cli, run
from hfcompress.data import prepare_task_data
from hfcompress.errors import HfCompressError
from hfcompress.recipe import parse_recipe

from conftest import classification_recipe, write_recipe


def write_csv(path, rows) -> str:
    pd.DataFrame(rows, columns=["text", "label"]).to_csv(path, index=False)
    return str(path)


def clean_rows(count: int = 40, labels=("neg", "pos")) -> list[tuple]:
    return [(f"review {i}: the film was {'great' if i % 2 else 'dull'}", labels[i % len(labels)]) for i in range(count)]


def task_of(data_file: str, **task) -> object:
    recipe = {"name": "x", "teacher": "unused", "stages": ["evaluate"],
              "task": {"type": "text-classification", "dataset": {"path": "csv", "data_files": data_file}, **task}}
    return parse_recipe(recipe).task


def one_line_error(task) -> str:
    with pytest.raises(HfCompressError) as caught:
        prepare_task_data(task, seed=0)
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_rows_with_an_empty_text_or_label_are_dropped_and_counted(tmp_path):
    rows = clean_rows()
    rows[2] = (None, "neg")
    rows[9] = ("   ", "pos")
    rows[5] = ("a fine film", None)
    data_file = write_csv(tmp_path / "reviews.csv", rows)
    prepared = prepare_task_data(task_of(data_file), seed=0)
    report = prepared.report
    assert report.rows_dropped == {"empty 'text'": 2, "empty 'label'": 1}
    assert f"{data_file}: 2 of 40 rows have an empty 'text' (rows 3, 10): dropped" in report.warnings
    assert f"{data_file}: 1 of 40 rows has an empty 'label' (row 6): dropped" in report.warnings
    assert sum(report.split_sizes.values()) == sum(len(s) for s in prepared.splits.values()) == 37
    assert report.class_counts == {"neg": 19, "pos": 18}
    assert None not in {text for split in prepared.splits.values() for text in split["text"]}


def test_incomplete_rows_are_refused_when_asked(tmp_path):
    rows = clean_rows()
    rows[2] = (None, "neg")
    data_file = write_csv(tmp_path / "reviews.csv", rows)
    message = one_line_error(task_of(data_file, drop_incomplete_rows=False))
    assert message == (f"{data_file}: 1 of 40 rows has an empty 'text' (row 3); "
                       f"set task.drop_incomplete_rows: true to drop them")


def test_labels_differing_only_in_case_are_an_error_naming_both(tmp_path):
    rows = clean_rows()
    rows[5] = ("a fine film", None)
    rows[7] = ("a fine film", "Pos")
    rows[11] = ("a fine film", " pos ")
    data_file = write_csv(tmp_path / "reviews.csv", rows)
    message = one_line_error(task_of(data_file))
    assert message == (f"{data_file}: column 'label' has labels that differ only in case or spaces: "
                       f"' pos ' (1 row) beside 'Pos' (1 row) beside 'pos' (17 rows); make them one label in the file")


def test_a_single_class_is_an_error(tmp_path):
    data_file = write_csv(tmp_path / "reviews.csv", clean_rows(labels=("pos",)))
    assert one_line_error(task_of(data_file)) == (
        f"{data_file}: column 'label' has a single class, 'pos' (40 rows): a classifier needs at least two")


def test_rare_classes_and_classes_missing_from_a_split_are_warnings(tmp_path):
    rows = clean_rows(60) + [("an odd one", "neutral")] * 3
    data_file = write_csv(tmp_path / "reviews.csv", rows)
    report = prepare_task_data(task_of(data_file), seed=0).report
    assert f"{data_file}: column 'label' has classes with fewer than 10 rows: 'neutral' (3); " \
           f"their scores will be noise" in report.warnings
    missing = [line for line in report.warnings if "has no 'label' example of 'neutral'" in line]
    assert missing, report.warnings  # 3 rows cannot reach all three splits


def test_label_names_are_enforced_and_other_values_counted_per_value(tmp_path):
    rows = clean_rows() + [("the plot: a man", "plot")] * 4 + [("the cast", "cast")] * 2
    data_file = write_csv(tmp_path / "reviews.csv", rows)
    prepared = prepare_task_data(task_of(data_file, label_names=["pos", "neg"]), seed=0)
    assert prepared.label_names == ["pos", "neg"]
    assert prepared.report.rows_dropped == {"label not in task.label_names": 6}
    assert prepared.report.notes == [
        f"{data_file}: dropped 6 rows whose 'label' is not in task.label_names: 'plot' (4), 'cast' (2)"]
    labels = [label for split in prepared.splits.values() for label in split["labels"]]
    assert sorted(set(labels)) == [0, 1] and len(labels) == 40
    texts = {label: text for split in prepared.splits.values() for label, text in zip(split["labels"], split["text"])}
    assert "great" in texts[0] and "dull" in texts[1]  # "pos" is id 0, as label_names says


def test_a_one_name_label_list_is_a_recipe_error(tmp_path):
    with pytest.raises(HfCompressError, match=r"task.label_names: List should have at least 2 items"):
        task_of("x.csv", label_names=["pos"])


def test_run_drops_counts_and_logs_incomplete_rows(tmp_path, tiny_bert_dir):
    rows = clean_rows(60)
    rows[0] = (None, "neg")
    data_file = write_csv(tmp_path / "reviews.csv", rows)
    recipe = classification_recipe(tiny_bert_dir, data_file, tmp_path / "run", label_column="label",
                                   label_names=None, splits={}, stages=[{"evaluate": {"measure_speed": False}}])
    results = run(parse_recipe(recipe))
    data = results.task.data
    assert data["rows_dropped"] == {"empty 'text'": 1}
    assert sum(data["split_sizes"].values()) == 59 and results.rows[0].metrics["num_examples"] == 6
    log = (tmp_path / "run" / "run.log").read_text()
    assert f"WARNING hfcompress: data: {data_file}: 1 of 60 rows has an empty 'text' (row 1): dropped" in log
    assert json.loads((tmp_path / "run" / "results.json").read_text())["task"]["data"] == data


def validate(capsys, recipe_path) -> tuple[int, str, str]:
    code = cli.main(["validate", str(recipe_path)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda r, tmp: r.update(teacher=str(tmp / "no-such-teacher")), "teacher: local path"),
        (lambda r, tmp: r.update(teacher=str(tmp)), "teacher: cannot load the config of"),
        (lambda r, tmp: r["task"].update(text_column="review"), "task.text_column: column 'review' not in dataset"),
        (lambda r, tmp: r["task"]["dataset"].update(data_files=str(tmp / "missing.csv")),
         "task.dataset.data_files: data file"),
        (lambda r, tmp: r["task"].update(label_names=["pos", "great"]), "task.label_names[1]: label 'great' does not"),
        (lambda r, tmp: r["stages"][1]["evaluate"].update(extra_datasets=[
            {"path": "csv", "data_files": str(tmp / "reviews.csv"), "text_column": "review", "label": "other"}]),
         "stages.02-evaluate.extra_datasets[0] (other): task.text_column: column 'review' not in dataset"),
    ],
    ids=["missing-teacher-folder", "folder-without-config", "missing-column", "missing-data-file", "label-set",
         "extra-set-column"],
)
def test_validate_checks_the_sources_in_one_line_and_writes_nothing(tmp_path, tiny_bert_dir, capsys, change, message):
    data_file = write_csv(tmp_path / "reviews.csv", clean_rows())
    recipe = classification_recipe(tiny_bert_dir, data_file, tmp_path / "run", label_column="label",
                                   label_names=["neg", "pos"], splits={})
    change(recipe, tmp_path)
    code, out, err = validate(capsys, write_recipe(tmp_path / "recipe.yaml", recipe))
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and message in errors[0] and "Traceback" not in err, err
    assert not (tmp_path / "run").exists()


def test_validate_reports_what_the_data_holds(tmp_path, tiny_bert_dir, capsys):
    rows = clean_rows()
    rows[3] = ("a film", "")
    data_file = write_csv(tmp_path / "reviews.csv", rows)
    recipe = classification_recipe(tiny_bert_dir, data_file, tmp_path / "run", label_column="label",
                                   label_names=None, splits={})
    code, out, err = validate(capsys, write_recipe(tmp_path / "recipe.yaml", recipe))
    assert code == 0, err
    assert f"data: {data_file}: 39 rows; train 31, validation 4, test 4; classes 'neg' 20, 'pos' 19" in out
    assert f"warning: {data_file}: 1 of 40 rows has an empty 'label' (row 4): dropped" in out
    lines = out.splitlines()
    ok = next(index for index, line in enumerate(lines) if line.endswith("ok (2 stages: 01-finetune, 02-evaluate)"))
    assert [line.split()[0] for line in lines[-2:]] == ["01-finetune", "02-evaluate"] and ok < len(lines) - 2  # the plan
    assert not (tmp_path / "run").exists()
