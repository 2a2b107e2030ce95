"""Memory probes: peak CUDA allocation or process RSS, RSS sampled while a block runs, and helpers that make CPU
RSS reflect live memory (weights copied out of memory-mapped files, freed heap handed back to the OS)."""

from __future__ import annotations

import ctypes
import gc
import resource
import threading
import time

import torch


def peak_memory_bytes(device: torch.device | None = None) -> tuple[int, str]:
    """(peak bytes, what was measured): CUDA max_memory_allocated, else the process's peak RSS."""
    if device is not None and device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "cuda_max_memory_allocated"
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, "process_peak_rss"


def current_rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def anon_rss() -> int:
    """Anonymous resident bytes of this process (RssAnon of /proc/self/status); the whole RSS where unavailable."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return current_rss()


@torch.no_grad()
def materialize_weights(model: torch.nn.Module) -> None:
    """Copy every floating-point parameter and buffer into ordinary (anonymous) memory, tied tensors once.

    Checkpoints are loaded memory-mapped; copied out, the weights of dense and decomposed models are measured alike.
    """
    for t in list(model.parameters()) + list(model.buffers()):
        if t.is_floating_point() and t.device.type == "cpu":
            t.data = t.data.clone()


def release_free_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc), so RSS reflects live memory."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class RssSampler:
    """Peak resident memory of this process while the `with` block runs (sampled by a background thread).

    probe: `current_rss` (the whole RSS) or `anon_rss`.
    """

    def __init__(self, interval: float = 0.002, probe=current_rss):
        self.interval = interval
        self.probe = probe
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.probe())
            time.sleep(self.interval)

    def __enter__(self) -> "RssSampler":
        self.peak = self.probe()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak = max(self.peak, self.probe())
