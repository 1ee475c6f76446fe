"""SmolLM2-135M: width pruning against the shipped depth pruning, at the same parameter count and healing budget.

recipes/smollm2-135m.yaml drops 8 of the 30 blocks (ShortGPT block influence): 134.5 M -> 106.2 M parameters, test
perplexity 56.08 -> 149.52, and 40 healing steps (token-level KL to the teacher's cached top-64 logits) bring it to
85.50. Here about the same count is reached by width instead:
- ffn:    every block's FFN 1536 -> 992 neurons (gradient importance; a multiple of 32),            106.3 M
- hidden: the residual stream 576 -> 450 channels (activation importance),                       105.1 M
- mixed:  hidden 576 -> 504 and FFN 1536 -> 1280 (Minitron prunes both; multiples of 8),          106.1 M
transformers' LlamaConfig refuses a hidden size its 9 heads do not divide, so the hidden sizes are multiples of 9
(450 is the nearest below 106.2 M; 504 = 7 x 72 is one of 8 and 9); no multiple of 32 except 288 is one of 9.
Each is healed exactly as the recipe heals the depth-pruned model (same distillation options, data and steps).

Phase 1 (`--heal` not given): every arm pruned and scored before healing, the hidden and mixed arms with each
channel importance (activation vs gradient) and RMSNorm handling (rescaled vs kept; the arms' defaults are
activation and rescaled), compared on the VALIDATION split (the choice) and reported on the test split.
Phase 2 (`--heal 40 [120 400] --arms depth mixed ...`): the arms healed with that many steps, test perplexity
after healing.

    python benchmarks/smollm2_width.py
    python benchmarks/smollm2_width.py --heal 40 --arms depth ffn hidden mixed
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml
from common import ROOT, save_results

import hfcompress
from hfcompress.recipe import parse_recipe

WORK = ROOT / "runs" / "smollm2-width"
RECIPE = ROOT / "recipes" / "smollm2-135m.yaml"
CALIBRATION = {"calibration_samples": 32, "calibration_batch_size": 4}
ARMS = {
    "depth": {"layers": {"drop": 8, "method": "block_influence"}},
    "ffn": {"ffn": {"sparsity": 0.354, "scope": "uniform"}, "round_to": 32},
    "hidden": {"hidden": {"size": 450}},
    "mixed": {"hidden": {"size": 504}, "ffn": {"sparsity": 0.16667, "scope": "uniform"}, "round_to": 8},
}
# Phase 1 also scores these variants of the hidden arms before healing: the importance and the norm handling.
VARIANTS = {f"{arm}-{method}-{norms}": (arm, method, norms) for arm in ("hidden", "mixed")
            for method in ("activation", "gradient") for norms in ("rescale", "keep")}
QUIET = {"measure_speed": False, "per_device_eval_batch_size": 4}


def shipped() -> dict:
    return yaml.safe_load(RECIPE.read_text())


def teacher_metrics() -> dict:
    """The GGUF teacher converted once (by a pipeline run of its own, into WORK/teacher/00-teacher) and scored."""
    recipe = shipped() | {"name": "smollm2-width-teacher", "stages": [{"evaluate": {**QUIET, "label": "teacher"}}]}
    return hfcompress.run(parse_recipe(recipe), output_dir=WORK / "teacher").rows[0].metrics


def heal_stage(steps: int) -> dict:
    distill = next(stage["distill"] for stage in shipped()["stages"] if "distill" in stage)
    return {"distill": {**distill, "max_steps": steps}}


def run_arm(name: str, prune: dict, heal: int | None) -> dict:
    stages = [{"prune": {**prune, **CALIBRATION}},
              {"evaluate": {**QUIET, "split": "validation", "label": "pruned (validation)"}},
              {"evaluate": {**QUIET, "label": "pruned"}}]
    if heal:
        stages += [heal_stage(heal), {"evaluate": {**QUIET, "label": "healed"}}]
    recipe = shipped() | {"name": f"smollm2-width-{name}", "teacher": str(WORK / "teacher" / "00-teacher"),
                          "stages": stages}
    results = hfcompress.run(parse_recipe(recipe), output_dir=WORK / (f"{name}-{heal}" if heal else name))
    rows = {row.label: row.metrics for row in results.rows}
    return {"parameters": rows["pruned"]["num_parameters"], "validation": rows["pruned (validation)"]["perplexity"],
            "pruned": rows["pruned"]["perplexity"], "healed": rows.get("healed", {}).get("perplexity"),
            "shape": results.stages[0].metrics["layer_shapes"][0],
            "hidden_size": results.stages[0].metrics["hidden_size"]["after"]}


def variant_prune(arm: str, method: str, norms: str) -> dict:
    prune = json.loads(json.dumps(ARMS[arm]))
    prune["hidden"].update({"method": method, "norms": norms})
    return prune


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--heal", type=int, nargs="+", help="healing steps (phase 2)")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    args = parser.parse_args()

    teacher = teacher_metrics()
    lines = [f"teacher: {teacher['num_parameters'] / 1e6:.2f} M parameters, test perplexity {teacher['perplexity']:.2f}"]
    results: dict = {"teacher": teacher}
    if not args.heal:
        results["variants"] = {name: run_arm(name, variant_prune(*spec), None) for name, spec in VARIANTS.items()}
        results["arms"] = {name: run_arm(name, ARMS[name], None) for name in args.arms if name not in ("hidden", "mixed")}
        lines.append("before healing (the hidden arms: channel importance x RMSNorm handling):")
        lines.append(f"  {'arm':28s} {'params (M)':10s} {'hidden':6s} {'FFN':5s} {'ppl validation':15s} {'ppl test':8s}")
        for name, arm in {**results["variants"], **results["arms"]}.items():
            lines.append(f"  {name:28s} {arm['parameters'] / 1e6:<10.2f} {arm['hidden_size']:<6d} "
                         f"{arm['shape']['ffn_size']:<5d} {arm['validation']:<15.2f} {arm['pruned']:<8.2f}")
    else:
        results["healed"] = {f"{name}-{steps}": run_arm(name, ARMS[name], steps)
                             for steps in args.heal for name in args.arms}
        lines.append("healed with the recipe's distillation (same options and data), test perplexity:")
        lines.append(f"  {'arm':12s} {'steps':5s} {'params (M)':10s} {'pruned':8s} {'healed':8s} {'recovered':9s}")
        for name, arm in results["healed"].items():
            recovered = (arm["pruned"] - arm["healed"]) / (arm["pruned"] - teacher["perplexity"])
            lines.append(f"  {name.rsplit('-', 1)[0]:12s} {name.rsplit('-', 1)[1]:5s} {arm['parameters'] / 1e6:<10.2f} "
                         f"{arm['pruned']:<8.2f} {arm['healed']:<8.2f} {100 * recovered:.0f}%")
    report = "\n".join([f"command: python benchmarks/{Path(sys.argv[0]).name} {' '.join(sys.argv[1:])}".rstrip(),
                        *lines])
    print(report)
    save_results("smollm2_width" + (f"_healed_{'_'.join(map(str, args.heal))}" if args.heal else ""), results, report)


if __name__ == "__main__":
    main()
