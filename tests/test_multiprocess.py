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
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, LlamaConfig, LlamaForCausalLM

from hfcompress import run
from hfcompress.recipe import parse_recipe

from conftest import HAMLET, classification_recipe, save_tiny_bert, write_recipe

ROOT = Path(__file__).resolve().parent.parent
TORCHRUN = shutil.which("torchrun", path=str(Path(sys.executable).parent))
ACCELERATE = shutil.which("accelerate", path=str(Path(sys.executable).parent))
needs_torchrun = pytest.mark.skipif(TORCHRUN is None, reason="torchrun not installed")
FAST_EVALUATE = {"timing_iterations": 1, "timing_warmup": 0, "throughput_batch_size": 2,
                 "per_device_eval_batch_size": 16}
FAST_COMPARE = {"rounds": 1, "block_calls": 1, "warmup_calls": 0, "throughput_batch_size": 2, "throughput_rounds": 1,
                "throughput_block_calls": 1}


@dataclass
class Launch:
    result: subprocess.CompletedProcess
    run_dir: Path
    writes: list[list]  # per rank: (event, path) under the run folder
    collectives: list[list]  # per rank: (collective, the hfcompress line that called it)
    checkpoint: list[str] | None = None  # a killed launch: the files of the training state it left

    @property
    def results(self) -> dict:
        return json.loads((self.run_dir / "results.json").read_text())


def launch(tmp_path: Path, recipe: dict, processes: int = 2, env: dict | None = None) -> Launch:
    """`torchrun -m hfcompress run` of `recipe` through tests/audit_writes.py, which records each rank's writes and
    collective calls."""
    run_dir, audit_dir = Path(recipe["output_dir"]), tmp_path / "audit"
    audit_dir.mkdir(parents=True, exist_ok=True)
    recipe_path = write_recipe(tmp_path / "recipe.yaml", recipe)
    env = {**os.environ, "RUN_DIR": str(run_dir), "AUDIT_DIR": str(audit_dir), "OMP_NUM_THREADS": "1", **(env or {})}
    result = subprocess.run(
        [TORCHRUN, "--standalone", "--nproc_per_node", str(processes), str(Path(__file__).with_name("audit_writes.py")),
         "run", str(recipe_path)],
        capture_output=True, text=True, env=env, timeout=300,
    )
    def read(name):
        return [json.loads((audit_dir / f"{name}{rank}.json").read_text()) for rank in range(processes)]
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
    """The SmolLM2 recipe's stages on a 3-block Llama, trained sharded (FSDP): evaluate, drop a block, heal by
    distillation from cached top-k logits of the sharded teacher, evaluate, quantize with bitsandbytes, quanto,
    GPTQ, round-to-nearest and GGUF, compare, card."""
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
        "distributed": {"strategy": "fsdp"},
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
    healing = results["stages"][2]["metrics"]
    assert healing["steps"] == 3 and healing["distributed"] == "fsdp"
    assert [entry["step"] for entry in healing["validation_history"]] == [3]


# ------------------------------------------------------- FSDP: sharded training matches one process, and resumes


@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory, tokenizer, reviews_csv):
    """The same finetune and distillations (a sharded teacher's cached outputs; a live teacher, a narrower student
    and its projection) run by two FSDP processes with batches of 8, killed after step 5 of the finetune
    (checkpointed at step 3) and resumed, and by one process accumulating two batches of 8 per step. No dropout:
    both runs see the same examples in every step and should differ only in how floats are summed."""
    tmp_path = tmp_path_factory.mktemp("fsdp")
    teacher = save_tiny_bert(tmp_path / "teacher", tokenizer, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    narrow = {"num_hidden_layers": 1, "hidden_size": 16, "num_attention_heads": 2, "intermediate_size": 32}
    schedule = {"per_device_train_batch_size": 8, "learning_rate": 1e-3, "logging_steps": 1, "eval_strategy": "no"}
    stages = [
        {"finetune": {**schedule, "max_steps": 6, "save_steps": 3, "eval_strategy": "steps", "eval_steps": 3}},
        {"distill": {**schedule, "max_steps": 3, "student": {"num_layers": 1}}},
        {"distill": {**schedule, "max_steps": 3, "teacher": "01-finetune", "cache_teacher_outputs": False,
                     "student": {"config_overrides": narrow}, "loss": {"weights": {"kl": 1.0, "hidden_mse": 1.0}}}},
    ]
    sharded = classification_recipe(teacher, reviews_csv, tmp_path / "fsdp" / "run", stages=stages)
    sharded["distributed"] = {"strategy": "fsdp"}
    killed = launch(tmp_path / "fsdp", sharded, env={"INTERRUPT_AT": "01-finetune:5"})
    state = killed.run_dir / ".01-finetune.partial" / "training_state"
    killed.checkpoint = sorted(path.relative_to(state).as_posix() for path in state.rglob("*") if path.is_file())
    resumed = launch(tmp_path / "fsdp", sharded)
    one_process = classification_recipe(teacher, reviews_csv, tmp_path / "single", stages=stages)
    for entry in one_process["stages"]:  # each step: the two batches the two processes take, one after the other
        next(iter(entry.values()))["gradient_accumulation_steps"] = 2
    return killed, resumed, run(parse_recipe(one_process)).model_dump(mode="json"), tmp_path / "single"


@needs_torchrun
def test_fsdp_run_killed_mid_stage_resumes_from_its_sharded_state(fsdp_runs):
    killed, resumed, _, _ = fsdp_runs
    assert killed.result.returncode != 0
    assert {"sharded/.metadata", "sharded/__0_0.distcp", "sharded/__1_0.distcp", "trainer_state.json"} <= set(
        killed.checkpoint)
    assert not any("model.safetensors" in name or name.startswith("optimizer") for name in killed.checkpoint), \
        "weights and optimizer state are saved sharded only"
    assert_ranks_left_together(resumed)
    assert "01-finetune resuming from step 3" in resumed.result.stderr
    assert resumed.results["stages"][0]["metrics"]["distributed"] == "fsdp"


@needs_torchrun
def test_fsdp_losses_and_weights_match_one_process(fsdp_runs):
    _, resumed, single, single_dir = fsdp_runs
    sharded = resumed.results
    for ours, theirs in zip(sharded["stages"], single["stages"]):
        steps = [entry["step"] for entry in ours["metrics"]["train_loss_history"]]
        assert steps == list(range(1, ours["metrics"]["steps"] + 1))
        for a, b in zip(ours["metrics"]["train_loss_history"], theirs["metrics"]["train_loss_history"]):
            assert a.keys() == b.keys()
            for name in a:
                assert a[name] == pytest.approx(b[name], abs=2e-5), (ours["id"], a["step"], name)
        weights_a = load_file(resumed.run_dir / ours["id"] / "model.safetensors")
        weights_b = load_file(single_dir / theirs["id"] / "model.safetensors")
        assert weights_a.keys() == weights_b.keys()
        for name in weights_a:
            torch.testing.assert_close(weights_a[name], weights_b[name], rtol=0, atol=5e-5, msg=f"{ours['id']}: {name}")
    def validation(results):
        return [entry["validation"]["accuracy"] for entry in results["stages"][0]["metrics"]["validation_history"]]
    assert validation(sharded) == validation(single)


@needs_torchrun
def test_fsdp_checkpoint_loads_with_plain_from_pretrained(fsdp_runs, tokenizer):
    _, resumed, _, single_dir = fsdp_runs
    inputs = tokenizer(["a gripping, funny film", "dull and far too long"], padding=True, return_tensors="pt")
    for stage_id in ("01-finetune", "03-distill"):
        ours = AutoModelForSequenceClassification.from_pretrained(resumed.run_dir / stage_id).eval()
        theirs = AutoModelForSequenceClassification.from_pretrained(single_dir / stage_id).eval()
        assert type(ours).__name__ == "BertForSequenceClassification"
        with torch.no_grad():
            torch.testing.assert_close(ours(**inputs).logits, theirs(**inputs).logits, rtol=0, atol=1e-4)


@needs_torchrun
def test_fsdp_shards_weights_and_optimizer_state_and_only_rank0_writes_the_model(fsdp_runs):
    _, resumed, single, _ = fsdp_runs
    for ours, theirs in zip(resumed.results["stages"], single["stages"]):
        sharded, whole = ours["metrics"]["memory_per_process"], theirs["metrics"]["memory_per_process"]
        for name in ("parameter_bytes", "optimizer_state_bytes"):
            assert sharded[name] < 0.55 * whole[name], (ours["id"], name)  # half, plus uneven shards' padding
    live_teacher = resumed.results["stages"][2]["metrics"]["memory_per_process"]["teacher_parameter_bytes"]
    assert 0 < live_teacher < 0.55 * single["stages"][2]["metrics"]["memory_per_process"]["teacher_parameter_bytes"]
    # Rank 1 writes nothing but its own shard of the training state (and the folder it goes in).
    own_shard = [[event, path] for event, path in resumed.writes[1] if "training_state.saving" in path]
    assert resumed.writes[1] == own_shard
    assert any(path.endswith("__1_0.distcp") for _, path in own_shard)
    assert not any(path.endswith("__0_0.distcp") or "model.safetensors" in path for _, path in resumed.writes[1])


# ----------------------------------------------------------------------------------------------- accelerate launch


@pytest.mark.skipif(ACCELERATE is None, reason="accelerate CLI not installed")
def test_accelerate_launch_with_the_shipped_fsdp_config_shards_on_cpu(tmp_path, tiny_bert_dir, reviews_csv):
    """accelerate's own FSDP2 config file: accelerate does not shard on CPU, hfcompress does (a plain DDP run, or two
    independent rank-0 runs, would be the silent alternatives)."""
    run_dir = tmp_path / "run"
    recipe = classification_recipe(tiny_bert_dir, reviews_csv, run_dir, stages=[
        {"finetune": {"max_steps": 2, "per_device_train_batch_size": 8, "eval_strategy": "no"}}])
    recipe_path = write_recipe(tmp_path / "recipe.yaml", recipe)
    result = subprocess.run(
        [ACCELERATE, "launch", "--config_file", str(ROOT / "recipes" / "accelerate" / "fsdp2.yaml"),
         "--mixed_precision", "no", "-m", "hfcompress", "run", str(recipe_path)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((run_dir / "results.json").read_text())["stages"][0]["metrics"]
    assert metrics["steps"] == 2 and metrics["distributed"] == "fsdp"
    saved = AutoModelForSequenceClassification.from_pretrained(run_dir / "01-finetune")
    whole = sum(p.numel() * p.element_size() for p in saved.parameters())
    assert metrics["memory_per_process"]["parameter_bytes"] < 0.55 * whole
