"""Two CPU processes (gloo) through torchrun, through every stage the shipped recipes use: the run exits 0, both ranks
make the same collective calls (so they leave together), training is distributed, and only rank 0 writes files.

Each launch is one module-scoped fixture that every assertion about it reuses.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import HAMLET, classification_recipe, write_recipe

TORCHRUN = shutil.which("torchrun", path=str(Path(sys.executable).parent))
ACCELERATE = shutil.which("accelerate", path=str(Path(sys.executable).parent))
needs_torchrun = pytest.mark.skipif(TORCHRUN is None, reason="torchrun not installed")
FAST_EVALUATE = {"timing_iterations": 1, "timing_warmup": 0, "throughput_batch_size": 2, "per_device_eval_batch_size": 16}
FAST_COMPARE = {"rounds": 1, "block_calls": 1, "warmup_calls": 0, "throughput_batch_size": 2, "throughput_rounds": 1,
                "throughput_block_calls": 1}


@dataclass
class Launch:
    result: subprocess.CompletedProcess
    run_dir: Path
    writes: list[list]  # per rank: (event, path) under the run folder
    collectives: list[list]  # per rank: (collective, the hfcompress line that called it)

    @property
    def results(self) -> dict:
        return json.loads((self.run_dir / "results.json").read_text())


def launch(tmp_path: Path, recipe: dict, processes: int = 2, env: dict | None = None) -> Launch:
    """`torchrun -m hfcompress run` of `recipe` through tests/audit_writes.py, which records each rank's writes and
    collective calls."""
    run_dir, audit_dir = Path(recipe["output_dir"]), tmp_path / "audit"
    audit_dir.mkdir(exist_ok=True)
    recipe_path = write_recipe(tmp_path / "recipe.yaml", recipe)
    env = {**os.environ, "RUN_DIR": str(run_dir), "AUDIT_DIR": str(audit_dir), "OMP_NUM_THREADS": "1", **(env or {})}
    result = subprocess.run(
        [TORCHRUN, "--standalone", "--nproc_per_node", str(processes), str(Path(__file__).with_name("audit_writes.py")),
         "run", str(recipe_path)],
        capture_output=True, text=True, env=env, timeout=300,
    )
    read = lambda name: [json.loads((audit_dir / f"{name}{rank}.json").read_text()) for rank in range(processes)]  # noqa: E731
    return Launch(result, run_dir, read("rank"), read("collectives"))


def assert_ranks_left_together(run: Launch) -> None:
    assert run.result.returncode == 0, run.result.stderr[-3000:]
    rank0, rank1 = ([name for name, _ in calls] for calls in run.collectives)
    assert rank0 == rank1, "the ranks made different collective calls:\n" + "\n".join(
        f"{a} | {b}" for a, b in zip(*run.collectives) if a[0] != b[0])
    assert rank0.count("barrier") > 10


def assert_only_rank0_wrote(run: Launch) -> None:
    assert run.writes[1] == [], f"rank 1 wrote: {run.writes[1][:5]}"
    assert any("results.json" in path for _, path in run.writes[0])
    assert run.result.stdout.count("evaluated model(s)") == 1, "only the main process prints the table"


# ------------------------------------------------------------------------- the quickstart's stages (classification)


@pytest.fixture(scope="module")
def quickstart_launch(tmp_path_factory, tiny_bert_dir, reviews_csv) -> Launch:
    """finetune, evaluate, distill to a narrower student (a projection trains across processes), prune heads, FFN
    neurons and the vocabulary, recovery distillation from cached teacher outputs, evaluate, quantize with every
    backend the quickstart uses, compare, card, push (dry run)."""
    tmp_path = tmp_path_factory.mktemp("quickstart")
    run_dir = tmp_path / "run"
    narrow_student = {"num_hidden_layers": 1, "hidden_size": 16, "num_attention_heads": 2, "intermediate_size": 32}
    stages = [
        {"finetune": {"max_steps": 4, "per_device_train_batch_size": 16, "learning_rate": 1e-3}},
        {"evaluate": {"label": "teacher", **FAST_EVALUATE}},
        {"distill": {"max_steps": 2, "eval_strategy": "no", "cache_teacher_outputs": False,
                     "student": {"config_overrides": narrow_student}, "loss": {"weights": {"kl": 1.0, "hidden_mse": 1.0}}}},
        {"prune": {"heads": {"count": 1}, "ffn": {"sparsity": 0.25}, "vocabulary": {"min_frequency": 1},
                   "calibration_samples": 16}},
        {"distill": {"teacher": "01-finetune", "max_steps": 2, "eval_strategy": "no"}},
        {"evaluate": {"label": "pruned", **FAST_EVALUATE}},
        {"quantize": {"variants": [{"backend": "bitsandbytes", "bits": 4, "quant_type": "nf4"},
                                   {"backend": "quanto", "weights": "int8"}, {"backend": "half", "dtype": "bfloat16"},
                                   {"backend": "onnx", "quantization": "int8-dynamic", "optimize": False}],
                      "calibration_samples": 16, "evaluate": FAST_EVALUATE}},
        {"compare": FAST_COMPARE},
        {"card": {"model_cards_dir": str(run_dir / "cards")}},
        {"push": {"repo_id": "alice/tiny", "dry_run": True}},
    ]
    return launch(tmp_path, classification_recipe(tiny_bert_dir, reviews_csv, run_dir, stages=stages))


@needs_torchrun
def test_quickstart_stages_exit_together(quickstart_launch):
    assert_ranks_left_together(quickstart_launch)


@needs_torchrun
def test_quickstart_stages_only_rank0_writes(quickstart_launch):
    assert_only_rank0_wrote(quickstart_launch)
    assert quickstart_launch.result.stdout.count("dry run: would upload") == 1


@needs_torchrun
def test_quickstart_stages_results(quickstart_launch):
    results = quickstart_launch.results
    assert results["environment"]["num_processes"] == 2
    stages = {record["id"]: record for record in results["stages"]}
    assert [record["stage"] for record in results["stages"]] == [
        "finetune", "evaluate", "distill", "prune", "distill", "evaluate", "quantize", "compare", "card", "push"]
    assert stages["03-distill"]["metrics"]["student_layers"] == 1
    assert stages["04-prune"]["metrics"]["vocabulary"]["tokens_kept"] < 30522
    assert stages["05-distill"]["metrics"]["steps"] == 2
    assert stages["07-quantize"]["metrics"]["failed_variants"] == {}
    assert stages["10-push"]["metrics"]["dry_run"] is True
    labels = [row["label"] for row in results["rows"]]
    assert labels == ["teacher", "pruned", "07-quantize/bnb-nf4", "07-quantize/quanto-int8", "07-quantize/bf16",
                      "07-quantize/onnx-int8-unfused"]
    assert all(row["metrics"]["num_examples"] == results["task"]["test_split_size"] for row in results["rows"])
    assert set(stages["08-compare"]["metrics"]["comparison"]["models"]) == set(labels)
    assert (quickstart_launch.run_dir / "cards" / "tiny" / "README.md").is_file()


# ----------------------------------------------------------------------------- the SmolLM2 recipe's stages (causal LM)


@pytest.fixture(scope="module")
def causal_lm_launch(tmp_path_factory, bpe_tokenizer) -> Launch:
    """The SmolLM2 recipe's stages on a 3-block Llama: evaluate, drop a block, heal by distillation from cached top-k
    teacher logits, evaluate, quantize with bitsandbytes, quanto, GPTQ, round-to-nearest and GGUF, compare, card."""
    tmp_path = tmp_path_factory.mktemp("causal-lm")
    teacher, run_dir = tmp_path / "llama", tmp_path / "run"
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(
        vocab_size=640, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, max_position_embeddings=128, bos_token_id=bpe_tokenizer.bos_token_id,
        eos_token_id=bpe_tokenizer.eos_token_id)).save_pretrained(teacher)
    bpe_tokenizer.save_pretrained(teacher)
    evaluate = {**FAST_EVALUATE, "per_device_eval_batch_size": 4}
    recipe = {
        "name": "tiny-lm", "seed": 0, "teacher": str(teacher), "output_dir": str(run_dir),
        "task": {"type": "causal-lm", "dataset": {"path": "text", "data_files": HAMLET}, "max_length": 32,
                 "max_train_samples": 64, "max_eval_samples": 8, "splits": {"validation_size": 0.05, "test_size": 0.05}},
        "stages": [
            {"evaluate": {"label": "teacher", **evaluate}},
            {"prune": {"layers": {"drop": 1}, "calibration_samples": 8, "calibration_batch_size": 4}},
            {"distill": {"teacher": "teacher", "cache_top_k": 16, "max_steps": 3, "per_device_train_batch_size": 4,
                         "per_device_eval_batch_size": 4, "eval_strategy": "steps", "eval_steps": 3}},
            {"evaluate": {"label": "healed", **evaluate}},
            {"quantize": {"variants": [
                {"backend": "bitsandbytes", "bits": 4, "quant_type": "nf4"}, {"backend": "bitsandbytes", "bits": 8},
                {"backend": "quanto", "weights": "int4", "group_size": 32},
                {"backend": "gptq", "bits": 4, "group_size": 32, "observer": "mse"},
                {"backend": "compressed-tensors", "bits": 4, "group_size": 32}, {"backend": "gguf", "type": "q8_0"}],
                "calibration_samples": 8, "tolerance": 0.05, "evaluate": evaluate}},
            {"compare": FAST_COMPARE},
            {"card": {"model_cards_dir": str(run_dir / "cards")}},
        ],
    }
    return launch(tmp_path, recipe)


@needs_torchrun
def test_causal_lm_stages_exit_together(causal_lm_launch):
    assert_ranks_left_together(causal_lm_launch)


@needs_torchrun
def test_causal_lm_stages_only_rank0_writes(causal_lm_launch):
    assert_only_rank0_wrote(causal_lm_launch)


@needs_torchrun
def test_causal_lm_stages_results(causal_lm_launch):
    results = causal_lm_launch.results
    quantize = next(record for record in results["stages"] if record["stage"] == "quantize")
    assert quantize["metrics"]["failed_variants"] == {}
    assert [row["label"] for row in results["rows"]] == [
        "teacher", "healed", "05-quantize/bnb-nf4", "05-quantize/bnb-int8", "05-quantize/quanto-int4-g32",
        "05-quantize/gptq-int4-g32-mse", "05-quantize/rtn-int4-g32", "05-quantize/gguf-q8_0"]
    assert all(row["metrics"]["perplexity"] > 1 for row in results["rows"])
    assert results["stages"][2]["metrics"]["steps"] == 3


# ----------------------------------------------------------------------------------------------- accelerate launch


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
