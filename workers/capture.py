"""Capture a job's stdout and stderr, at the file-descriptor level, while it runs.

A Ray worker's output goes to Ray's log files on its node, mixed with every other job
that worker ran. Capturing fds 1 and 2 (not just sys.stdout) also catches what
TensorFlow's and torch's C++ code writes. The text travels back with the job's result,
or on the exception when the job fails, and the driver keeps it in the run's directory.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Iterator

# The most of each stream kept per job; the tail is what explains a failure.
LIMIT_BYTES = 1_000_000


class CapturedOutput:
    def __init__(self) -> None:
        self.stdout = ""
        self.stderr = ""

    def as_dict(self) -> dict[str, str]:
        return {"stdout": self.stdout, "stderr": self.stderr}


@contextlib.contextmanager
def captured_output() -> Iterator[CapturedOutput]:
    captured = CapturedOutput()
    files = [tempfile.TemporaryFile(mode="w+b") for _ in range(2)]
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    os.dup2(files[0].fileno(), 1)
    os.dup2(files[1].fileno(), 2)
    try:
        yield captured
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for descriptor in saved:
            os.close(descriptor)
        texts = []
        for handle in files:
            size = handle.seek(0, os.SEEK_END)
            handle.seek(max(size - LIMIT_BYTES, 0))
            texts.append(handle.read().decode("utf-8", errors="replace"))
            handle.close()
        captured.stdout, captured.stderr = texts
