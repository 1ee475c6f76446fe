"""The shared training loop: an interrupted stage resumes from its last checkpoint and ends where a straight run ends."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import hfcompress.stages.finetune as finetune
from hfcompress import run
from hfcompress.recipe import parse_recipe

from conftest import classification_recipe


def recipe_for(tiny_bert_dir, reviews_csv, run_dir):
    return parse_recipe(classification_recipe(
        tiny_bert_dir, reviews_csv, run_dir,
        stages=[{"finetune": {"max_steps": 8, "save_steps": 3, "eval_strategy": "steps", "eval_steps": 4,
                              "per_device_train_batch_size": 8, "learning_rate": 1e-3}}],
    ))


def test_resume_mid_stage_gives_the_same_weights_as_a_straight_run(tmp_path, tiny_bert_dir, reviews_csv, monkeypatch):
    straight_dir, resumed_dir = tmp_path / "straight", tmp_path / "resumed"
    run(recipe_for(tiny_bert_dir, reviews_csv, straight_dir))

    calls = {"n": 0}
    original = finetune.task_loss

    def interrupted_loss(model, batch):
        calls["n"] += 1
        if calls["n"] == 8:  # in step 8: after the checkpoint at step 6 and the evaluation at step 4
            raise KeyboardInterrupt
        return original(model, batch)

    monkeypatch.setattr(finetune, "task_loss", interrupted_loss)
    with pytest.raises(KeyboardInterrupt):
        run(recipe_for(tiny_bert_dir, reviews_csv, resumed_dir))
    partial = resumed_dir / ".01-finetune.partial"
    assert (partial / "training_state" / "trainer_state.json").is_file()
    assert not (resumed_dir / "01-finetune").exists()

    resumed_calls = []
    monkeypatch.setattr(finetune, "task_loss", lambda model, batch: resumed_calls.append(1) or original(model, batch))
    resumed = run(recipe_for(tiny_bert_dir, reviews_csv, resumed_dir))
    assert len(resumed_calls) == 2, "the resumed run trains only steps 7 and 8"
    assert not partial.exists()
    history = resumed["stages"][0]["metrics"]["validation_history"]
    assert [entry["step"] for entry in history] == [4, 8]

    a = load_file(straight_dir / "01-finetune" / "model.safetensors")
    b = load_file(resumed_dir / "01-finetune" / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6, msg=name)
