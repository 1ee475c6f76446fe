"""The `distributed:` block and the checks that keep a launch from silently running as something else."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from accelerate.utils import DistributedType

from hfcompress.distributed import check_world
from hfcompress.errors import HfCompressError
from hfcompress.pipeline import check_sources
from hfcompress.recipe import parse_recipe

from conftest import classification_recipe


def accelerator(num_processes: int, distributed_type: DistributedType):
    return SimpleNamespace(num_processes=num_processes, distributed_type=distributed_type)


def test_a_launch_that_accelerate_sees_as_one_process_is_an_error(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(HfCompressError, match=r"^launched as 2 processes \(WORLD_SIZE=2\) but accelerate formed a "
                                              r"world of 1 .*every process would run alone as the main process"):
        check_world(accelerator(1, DistributedType.NO), None)
    check_world(accelerator(2, DistributedType.MULTI_CPU), None)


def test_deepspeed_that_accelerate_would_run_as_ddp_is_an_error(monkeypatch, tiny_bert_dir, reviews_csv, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "2")
    recipe = parse_recipe({**classification_recipe(tiny_bert_dir, reviews_csv, tmp_path),
                           "distributed": {"strategy": "deepspeed"}})
    with pytest.raises(HfCompressError, match=r"^distributed.strategy: deepspeed, but accelerate runs "
                                              r"DistributedType.MULTI_CPU .*would train as DDP"):
        check_world(accelerator(2, DistributedType.MULTI_CPU), recipe.distributed)
    check_world(accelerator(2, DistributedType.DEEPSPEED), recipe.distributed)


@pytest.mark.parametrize("distributed, message", [
    ({"strategy": "zero"}, r"distributed.strategy: Input should be 'ddp', 'fsdp' or 'deepspeed'"),
    ({"strategy": "fsdp", "shard": True}, r"distributed.shard: (unknown key|Extra inputs are not permitted)"),
])
def test_bad_distributed_options_are_one_line_errors(tiny_bert_dir, reviews_csv, tmp_path, distributed, message):
    with pytest.raises(HfCompressError, match=message) as error:
        parse_recipe({**classification_recipe(tiny_bert_dir, reviews_csv, tmp_path), "distributed": distributed})
    assert "\n" not in str(error.value)


def test_fsdp_refuses_fp16(tiny_bert_dir, reviews_csv, tmp_path):
    with pytest.raises(HfCompressError, match="fsdp trains in bf16 or fp32"):
        parse_recipe({**classification_recipe(tiny_bert_dir, reviews_csv, tmp_path), "mixed_precision": "fp16",
                      "distributed": {"strategy": "fsdp"}})


def test_validate_says_which_stages_run_unsharded(tiny_bert_dir, reviews_csv, tmp_path):
    stages = [{"finetune": {"max_steps": 2}}, {"evaluate": {}}, {"prune": {"ffn": {"sparsity": 0.25}}},
              {"distill": {"teacher": "01-finetune", "max_steps": 2}},
              {"quantize": {"variants": [{"backend": "half"}]}}]
    recipe = classification_recipe(tiny_bert_dir, reviews_csv, tmp_path, stages=stages)
    assert not [line for line in check_sources(parse_recipe(recipe)) if "fsdp" in line]
    lines = check_sources(parse_recipe({**recipe, "distributed": {"strategy": "fsdp"}}))
    [note] = [line for line in lines if "fsdp" in line]
    assert note.startswith("note: distributed.strategy fsdp: 02-evaluate, 03-prune, 05-quantize run on the main "
                           "process alone with the whole model")
