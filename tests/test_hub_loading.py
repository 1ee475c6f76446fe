"""Published checkpoints load anywhere: every kind the recipes publish is pushed to the local stand-in for the Hub,
then loaded back by repo id (1) through its own model card's snippet, run in an interpreter where hfcompress cannot
be imported (transformers alone, plus the quantization runtime the card names), and (2) by
`hfcompress.from_pretrained(repo_id)`. Both must give the logits of the model that was saved.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    BertConfig,
    BertForSequenceClassification,
    BertTokenizerFast,
    LlamaConfig,
    LlamaForCausalLM,
)

from hfcompress.card import write_model_card
from hfcompress.pruning import prune_ffn, prune_heads, prune_layers
from hfcompress.quantization import parse_variant, quantize, save_quantized, variant_name
from hub_server import LocalHub
from test_card import causal_lm_results, classification_results, classification_stages, write_fake_run
from test_hub import SENTENCES, TOKEN, VOCAB, run_client

# Every kind is compared with the in-process model it was saved from: reloading must reproduce it.
TOLERANCE = 1e-5

BLOCK_HFCOMPRESS = """
import importlib.abc, json, re, sys
class NoHfcompress(importlib.abc.MetaPathFinder):  # a user who has only transformers (and a quantization runtime)
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "hfcompress":
            raise ModuleNotFoundError(f"No module named {name!r}")
sys.meta_path.insert(0, NoHfcompress())
def report(**values):
    print("RESULT " + json.dumps(values))
"""


@dataclass
class Kind:
    name: str
    run_dir: Path
    expected: torch.Tensor  # logits of the in-process model on SENTENCES
    remote_code: bool

    @property
    def repo_id(self) -> str:
        return f"alice/{self.name}"


@pytest.fixture
def hub():
    with LocalHub(valid_token=TOKEN) as server:
        yield server


def tiny_tokenizer(folder: Path) -> BertTokenizerFast:
    vocab_file = folder / "vocab.txt"
    vocab_file.write_text("\n".join(VOCAB) + "\n")
    return BertTokenizerFast(vocab_file=str(vocab_file), model_input_names=["input_ids", "attention_mask"])


def logits_of(model, tokenizer) -> torch.Tensor:
    with torch.no_grad():
        return model(**tokenizer(SENTENCES, padding=True, return_tensors="pt")).logits.float()


def classifier() -> BertForSequenceClassification:
    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(
        vocab_size=len(VOCAB), hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        max_position_embeddings=64, num_labels=2, id2label={0: "rotten", 1: "fresh"},
        label2id={"rotten": 0, "fresh": 1})).eval()


def causal_lm() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=len(VOCAB), hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, bos_token_id=2, eos_token_id=3, pad_token_id=0)).eval()


def publish(root: Path, name: str, results: dict, save) -> Path:
    """A finished run whose final checkpoint `save(folder)` writes, with its card; returns the run directory."""
    run = write_fake_run(root / name, results=results, final_files={})
    save(run / results["final_model_dir"])
    write_model_card(run, root / "model_cards", repo_id=f"alice/{name}")
    return run


def build_kinds(root: Path) -> list[Kind]:
    tokenizer = tiny_tokenizer(root)
    kinds = []

    def add(name, model, results, save, remote_code):
        def save_with_tokenizer(folder):
            save(folder)
            tokenizer.save_pretrained(folder)
        kinds.append(Kind(name, publish(root, name, results, save_with_tokenizer), logits_of(model, tokenizer),
                          remote_code))

    classification = classification_results(final_model_dir="final", rows=[],
                                            stages=classification_stages(("distill", "prune")))
    distilled = classifier()
    add("distilled", distilled, classification, distilled.save_pretrained, remote_code=False)

    pruned = classifier()
    prune_heads(pruned, {0: [1]})  # 3 heads in layer 0, 4 in layer 1: BERT's config cannot say so
    prune_ffn(pruned, {1: list(range(10))})
    pruned_dir = root / "pruned-float"
    pruned.save_pretrained(pruned_dir)  # the habitual save
    add("pruned", pruned, classification, pruned.save_pretrained, remote_code=True)

    for options in ({"backend": "half", "dtype": "bfloat16"}, {"backend": "bitsandbytes", "bits": 8},
                    {"backend": "bitsandbytes", "bits": 4, "quant_type": "nf4"}, {"backend": "quanto", "weights": "int8"},
                    {"backend": "bitsandbytes", "bits": 8, "quantize_embeddings": True}):
        variant = parse_variant(options)
        model = quantize(pruned_dir, AutoModelForSequenceClassification, variant)
        add(f"pruned-{variant_name(variant)}", model, classification,
            lambda folder, model=model, variant=variant: save_quantized(model, folder, variant), remote_code=True)

    causal = causal_lm_results()  # final checkpoint: 01-prune
    dropped = causal_lm()
    prune_layers(dropped, [1, 2])  # like the SmolLM2 recipe: whole blocks dropped, the config says it all
    dropped_dir = root / "dropped-float"
    dropped.save_pretrained(dropped_dir)
    add("lm-layers-dropped", dropped, causal, dropped.save_pretrained, remote_code=False)

    grouped = causal_lm()
    prune_heads(grouped, {0: [0, 1]})  # layer 0 loses a key/value group, the others keep both
    add("lm-pruned-heads", grouped, causal, grouped.save_pretrained, remote_code=True)

    int4 = parse_variant({"backend": "quanto", "weights": "int4", "group_size": 32})
    quantized_lm = quantize(dropped_dir, AutoModelForCausalLM, int4)
    add("lm-quanto-int4-g32", quantized_lm, causal, lambda folder: save_quantized(quantized_lm, folder, int4),
        remote_code=True)
    return kinds


def test_every_published_kind_loads_by_repo_id_with_transformers_alone_and_with_hfcompress(hub, tmp_path):
    kinds = build_kinds(tmp_path)
    repos = [kind.repo_id for kind in kinds]
    pruned = next(kind for kind in kinds if kind.name == "pruned")

    pushed, _ = run_client(f"""
import torch
import hfcompress
from transformers import AutoTokenizer
runs = {[(str(kind.run_dir), kind.repo_id) for kind in kinds]!r}
for run, repo_id in runs:
    assert push_or_error(Path(run), repo_id)["new_commit"]
assert push_or_error(Path({str(pruned.run_dir)!r}), "alice/on-a-branch", revision="compressed")["new_commit"]
for repo_id in [repo_id for _, repo_id in runs] + ["alice/on-a-branch"]:
    revision = "compressed" if repo_id == "alice/on-a-branch" else None
    model = hfcompress.from_pretrained(repo_id, revision=revision, token={TOKEN!r})
    tokenizer = AutoTokenizer.from_pretrained(repo_id, revision=revision)
    with torch.no_grad():
        logits = model(**tokenizer({SENTENCES!r}, padding=True, return_tensors="pt")).logits.float()
    report(repo_id=repo_id, logits=logits.tolist())
""", tmp_path / "publisher", hub.url)

    loaded, output = run_client(f"""
import torch
from huggingface_hub import ModelCard
try:
    import hfcompress
    report(hfcompress_importable=True)
except ModuleNotFoundError:
    report(hfcompress_importable=False)
for repo_id in {repos!r}:
    card = ModelCard.load(repo_id).text
    snippet = re.search(r"## How to use\\n\\n```python\\n(.*?)```", card, re.S).group(1)
    namespace = {{}}
    exec(compile(snippet, repo_id + " model card", "exec"), namespace)  # prints a label or a generated text
    model, tokenizer = namespace["model"], namespace["tokenizer"]
    with torch.no_grad():
        logits = model(**tokenizer({SENTENCES!r}, padding=True, return_tensors="pt")).logits.float()
    report(repo_id=repo_id, logits=logits.tolist(), snippet=snippet, model_class=type(model).__module__)
""", tmp_path / "user", hub.url, prelude=BLOCK_HFCOMPRESS)

    assert loaded[0] == {"hfcompress_importable": False}
    by_repo = {record["repo_id"]: record for record in loaded[1:]}
    from_hfcompress = {record["repo_id"]: record for record in pushed}
    for kind in kinds:
        record = by_repo[kind.repo_id]
        torch.testing.assert_close(torch.tensor(record["logits"]), kind.expected, rtol=0, atol=TOLERANCE,
                                   msg=f"{kind.name} through its card")
        torch.testing.assert_close(torch.tensor(from_hfcompress[kind.repo_id]["logits"]), kind.expected, rtol=0,
                                   atol=TOLERANCE, msg=f"{kind.name} through hfcompress.from_pretrained")
        assert ("trust_remote_code=True" in record["snippet"]) == kind.remote_code, kind.name
        assert record["model_class"].startswith("transformers_modules.") == kind.remote_code, kind.name
        assert "hfcompress" not in record["snippet"]
    torch.testing.assert_close(torch.tensor(from_hfcompress["alice/on-a-branch"]["logits"]), pruned.expected,
                               rtol=0, atol=TOLERANCE)
    assert "Traceback" not in output


def test_the_published_modeling_file_needs_only_torch_and_transformers():
    """What transformers checks before running remote code: every import outside try blocks must be installed."""
    from transformers.dynamic_module_utils import get_imports

    import hfcompress.modeling_hfcompress as modeling_file

    assert set(get_imports(modeling_file.__file__)) - {"__future__", "dataclasses", "json", "re"} == {"torch",
                                                                                                   "transformers"}
