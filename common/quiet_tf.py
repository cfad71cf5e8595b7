"""Import TensorFlow and Keras without their start-up chatter.

TensorFlow's C++ side writes several lines to the process's standard error
while it loads (oneDNN notes, a missing CUDA driver on CPU machines), and
``TF_CPP_MIN_LOG_LEVEL`` no longer silences all of them. The console should
show the federation's progress, so the import runs with file descriptor 2
pointed at /dev/null. Python exceptions are unaffected: an import that fails
still raises, and the error is shown once descriptor 2 is back.

Import ``tf`` and ``keras`` from here, never directly, in modules that the
console scripts load.
"""

from __future__ import annotations

import contextlib
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@contextlib.contextmanager
def _stderr_silenced():
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


with _stderr_silenced():
    import keras
    import tensorflow as tf

    # Probing the devices here keeps the CUDA probe's error line quiet too.
    tf.config.list_physical_devices("GPU")

__all__ = ["keras", "tf"]
