"""Keep vLLM's processes from outliving a killed worker.

vLLM runs its engine core (and that, its model workers) in child processes;
after a SIGKILL of the worker they stay alive with their memory (seen: all
three alive 10 s later), and a GPU's. So each of them asks the kernel to
SIGKILL it when its parent dies (``PR_SET_PDEATHSIG``, Linux):

- processes vLLM *spawns* (its CPU platform always does) run this module's
  ``register`` as a vLLM general plugin, an entry point that vLLM loads in
  every process it starts (pyproject.toml);
- processes vLLM *forks* (on GPUs) get it from an at-fork hook that
  ``worker/engines/vllm.py`` installs.

Only where the worker asked for it (``LLMQ_VLLM_WORKER_PID``, which the
children inherit), and never in the worker itself.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

ENV = "LLMQ_VLLM_WORKER_PID"
PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    if sys.platform != "linux" or os.environ.get(ENV) in (None, str(os.getpid())):
        return
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() == 1:  # the parent died before the prctl took effect
        os._exit(1)


def register() -> None:
    """vLLM's general-plugin hook."""
    die_with_parent()
