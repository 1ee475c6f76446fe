"""Run the hfcompress CLI while recording, per process, every file-system write under RUN_DIR (test helper).

Used under torchrun: each rank writes what it touched to $AUDIT_DIR/rank<RANK>.json at exit.
"""

import atexit
import json
import os
import sys

RUN_DIR = os.path.realpath(os.environ["RUN_DIR"])
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
touched = []


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


def _report():
    path = os.path.join(os.environ["AUDIT_DIR"], f"rank{os.environ.get('RANK', '0')}.json")
    with open(path, "w") as handle:
        json.dump(touched, handle)


sys.addaudithook(_hook)
atexit.register(_report)

from hfcompress.cli import main  # noqa: E402

sys.exit(main(sys.argv[1:]))
