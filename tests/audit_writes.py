"""Run the hfcompress CLI while recording, per process, every file-system write under RUN_DIR and every collective
call (barriers included) with the hfcompress line that made it (test helper).

Used under torchrun: each rank writes what it touched to $AUDIT_DIR/rank<RANK>.json and its collectives to
$AUDIT_DIR/collectives<RANK>.json at exit. Ranks that leave together made the same sequence of collectives.
With $INTERRUPT_AT=<stage id>:<step>, every rank stops dead after that optimizer step (a killed run).
"""

import atexit
import functools
import json
import os
import sys
import traceback

import torch.distributed

RUN_DIR = os.path.realpath(os.environ["RUN_DIR"])
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
COLLECTIVES = ["barrier", "all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "broadcast",
               "broadcast_object_list", "gather", "gather_object", "scatter", "reduce", "reduce_scatter_tensor"]
touched = []
collectives = []


def _inside(path) -> bool:
    try:
        return os.path.realpath(os.fsdecode(path)).startswith(RUN_DIR)
    except (TypeError, ValueError):
        return False


def _hook(event, args):
    if event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
        mode, flags = args[1], args[2]
        writes = any(c in (mode or "") for c in "wax+") or bool((flags or 0) & WRITE_FLAGS)
        if writes and _inside(args[0]):
            touched.append(("open", os.fsdecode(args[0])))
    elif event in ("os.mkdir", "os.rename", "os.remove", "os.rmdir", "shutil.rmtree") and args and _inside(args[0]):
        touched.append((event, os.fsdecode(args[0])))


def _caller() -> str:
    """The innermost hfcompress frame that led to the call."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        if f"{os.sep}hfcompress{os.sep}" in frame.filename:
            return f"{os.path.basename(frame.filename)}:{frame.lineno} {frame.name}"
    return "?"


def _recorded(name, function):
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        collectives.append((name, _caller()))
        return function(*args, **kwargs)
    return wrapper


def _report():
    rank = os.environ.get("RANK", "0")
    with open(os.path.join(os.environ["AUDIT_DIR"], f"rank{rank}.json"), "w") as handle:
        json.dump(touched, handle)
    with open(os.path.join(os.environ["AUDIT_DIR"], f"collectives{rank}.json"), "w") as handle:
        json.dump(collectives, handle)


for _name in COLLECTIVES:
    setattr(torch.distributed, _name, _recorded(_name, getattr(torch.distributed, _name)))
sys.addaudithook(_hook)
atexit.register(_report)

import hfcompress.training  # noqa: E402
from hfcompress.cli import main  # noqa: E402


class Interrupt(hfcompress.training.TrainingHook):
    def __init__(self, stage_id, step, ctx):
        self.stage_id, self.step, self.ctx = stage_id, int(step), ctx

    def on_step_end(self, state, model):
        if self.ctx.stage_id == self.stage_id and state.global_step == self.step:
            _report()
            os._exit(3)  # no cleanup, like a kill


def _interrupting(train):
    @functools.wraps(train)
    def wrapper(ctx, *args, **kwargs):
        stage_id, step = os.environ["INTERRUPT_AT"].split(":")
        return train(ctx, *args, hooks=[*kwargs.pop("hooks", []), Interrupt(stage_id, step, ctx)], **kwargs)
    return wrapper


if os.environ.get("INTERRUPT_AT"):
    import hfcompress.stages.distill
    import hfcompress.stages.finetune

    for module in (hfcompress.stages.finetune, hfcompress.stages.distill):
        module.train = _interrupting(module.train)

sys.exit(main(sys.argv[1:]))
