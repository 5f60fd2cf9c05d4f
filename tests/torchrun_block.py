"""Runs one ``# torchrun`` block of a documentation page as its first line says, on every rank,
then the block's check from tests/test_readme.py:

    python -m torch.distributed.run --nproc_per_node N tests/torchrun_block.py PAGE HEADING

Each rank prints one line once the block ran and its check passed. Not a test module: the
test of the pages starts it (tests/test_readme.py).
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_readme import CHECKS, python_blocks  # noqa: E402


def main(page: str, heading: str) -> None:
    [code] = [code for title, code in python_blocks(page) if title == heading]
    scope = {"__name__": "__main__"}
    exec(compile(code, f"{page}:{heading}", "exec"), scope)
    check = CHECKS.get((page, heading))
    if check is not None:
        check(scope, {})
    print(f"rank {os.environ['RANK']}: the block ran and passed its check", flush=True)
    # Leave without the interpreter's teardown: the block destroyed its process group, and once (a CI
    # run on a loaded machine, 2026-12-04) torch's teardown after that aborted a rank that had passed
    # ("terminate called without an active exception"); nothing of this package runs at exit.
    os._exit(0)


if __name__ == "__main__":
    main(*sys.argv[1:3])
