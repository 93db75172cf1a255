"""The ``mailsync`` command's entry point, light on purpose.

A console script imports its target's module before it calls anything, and
the command line's imports are most of a small command's time: a Ctrl-C
then would print a traceback. This module imports nothing heavy itself and
says an interrupted start-up in one line, like an interrupted command.
"""

from __future__ import annotations

import sys

from mailsync.errors import INTERRUPTED


def main() -> None:
    try:
        from mailsync import allocator, faults

        allocator.pin_mmap_threshold()

        faults.point("start")
        from mailsync.cli import main as run
    except KeyboardInterrupt:
        print(f"\n{INTERRUPTED}", file=sys.stderr)
        sys.exit(130)
    run()
