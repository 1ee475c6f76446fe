"""Two CPU processes (gloo) through torchrun: training is distributed, and only rank 0 writes files."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import classification_recipe, write_recipe

TORCHRUN = shutil.which("torchrun", path=str(Path(sys.executable).parent))


@pytest.mark.skipif(TORCHRUN is None, reason="torchrun not installed")
def test_two_process_finetune_only_rank0_writes(tmp_path, tiny_bert_dir, reviews_csv):
    run_dir, audit_dir = tmp_path / "run", tmp_path / "audit"
    audit_dir.mkdir()
    recipe = classification_recipe(tiny_bert_dir, reviews_csv, run_dir)
    narrow_student = {"num_hidden_layers": 1, "hidden_size": 16, "num_attention_heads": 2, "intermediate_size": 32}
    recipe["stages"].insert(1, {"distill": {  # a narrower student: the hidden-state projection trains across processes
        "max_steps": 2, "eval_strategy": "no", "cache_teacher_outputs": False,
        "student": {"config_overrides": narrow_student}, "loss": {"weights": {"kl": 1.0, "hidden_mse": 1.0}}}})
    recipe_path = write_recipe(tmp_path / "recipe.yaml", recipe)
    env = {**os.environ, "RUN_DIR": str(run_dir), "AUDIT_DIR": str(audit_dir), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [TORCHRUN, "--standalone", "--nproc_per_node", "2", str(Path(__file__).with_name("audit_writes.py")),
         "run", str(recipe_path)],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]

    rank0 = json.loads((audit_dir / "rank0.json").read_text())
    rank1 = json.loads((audit_dir / "rank1.json").read_text())
    assert rank1 == [], f"rank 1 wrote: {rank1[:5]}"
    assert any("results.json" in path for _, path in rank0)

    results = json.loads((run_dir / "results.json").read_text())
    assert results["environment"]["num_processes"] == 2
    assert (run_dir / "01-finetune" / "model.safetensors").is_file()
    assert results["stages"][1]["metrics"]["student_layers"] == 1
    [row] = results["rows"]
    assert row["metrics"]["num_examples"] == results["task"]["test_split_size"]
    assert result.stdout.count("evaluated model(s)") == 1, "only the main process prints the table"


ACCELERATE = shutil.which("accelerate", path=str(Path(sys.executable).parent))


@pytest.mark.skipif(ACCELERATE is None, reason="accelerate CLI not installed")
def test_accelerate_launch_runs_the_module(tmp_path, tiny_bert_dir, reviews_csv):
    run_dir = tmp_path / "run"
    recipe = classification_recipe(tiny_bert_dir, reviews_csv, run_dir, stages=[{"finetune": {"max_steps": 2}}])
    recipe_path = write_recipe(tmp_path / "recipe.yaml", recipe)
    result = subprocess.run(
        [ACCELERATE, "launch", "--cpu", "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no",
         "--dynamo_backend", "no", "-m", "hfcompress", "run", str(recipe_path)],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((run_dir / "results.json").read_text())["stages"][0]["metrics"]["steps"] == 2
