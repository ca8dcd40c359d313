"""Worker of tests/test_run_folders.py: ``lcma-ext run`` under torchrun, rank 1 killed mid-run.

Run as ``torchrun --standalone --nproc_per_node 2 tests/workers/ddp_kill.py RUN_ARGS...``. Rank 1
dies (``os._exit``) when the NMS contributions are due, as a killed process would; rank 0 is then
waiting for it in a collective and must stop with one line, not gloo's traceback. (Run it with
``--monitor-interval 2``, so that torchrun does not stop rank 0 before it has noticed.)
"""

from __future__ import annotations

import os
import sys
import time

from lcma_ext import cli
from lcma_ext.distributed import world
from lcma_ext.experiments import runner


def _killed(*args: object, **kwargs: object) -> None:
    time.sleep(2)  # rank 0 writes the NMS files meanwhile, then waits for rank 1 in a barrier
    os._exit(9)


if __name__ == "__main__":
    if int(os.environ.get("RANK", "0")) == 1:
        runner._contributions = _killed  # type: ignore[assignment]
    status = cli.main(sys.argv[1:])
    print(f"rank {world().rank} exit status {status}", file=sys.stderr, flush=True)
    sys.exit(status)
