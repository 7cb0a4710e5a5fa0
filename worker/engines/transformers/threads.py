"""torch's CPU threads, kept for the engine threads (see ``engine_threads``)."""

from __future__ import annotations

import torch


def engine_threads() -> int:
    """Keep torch's CPU threads for the engine threads: call once in the
    worker's main thread, before any model is loaded; returns the count each
    engine thread takes.

    torch's CPU kernels run on OpenMP, and libgomp keeps one thread team per
    thread that ever ran a parallel region. Once the main thread (which
    loads the model) has a team of its own, the engine thread's team makes
    more OpenMP threads than cores, and libgomp then stops spinning between
    regions: every matmul of a decode step pays a wake-up. Measured on a
    2-core CPU: one decode step of the demo model took 56 ms from a second
    thread against 34 ms from the first. So the main thread works on one
    thread (no team) and each engine thread asks for all of them.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    return threads
