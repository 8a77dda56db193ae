"""The body of one ``ep`` process in tests/test_crash.py (kept free of lance imports: the
fork server that preloads this module must not have started lance, which is not fork-safe)."""

from __future__ import annotations

import os
import sys


def run_ep(args: list[str], log: str) -> None:
    """Run ``ep ARGS`` in this forked process, output appended to ``log``."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    sys.argv = ["ep", *args]
    from ep_store.cli.main import main

    main(args=args, prog_name="ep")
