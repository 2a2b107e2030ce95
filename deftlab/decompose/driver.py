"""The loop over a model's matrices: whitened (or plain) SVD of each, shared Cholesky factors, cache reuse, and
two CPU workers.

Matrices that read the same Gram (q/k/v, gate/up) form one task sharing one Cholesky factor. On CPU the tasks run
on two threads, torch's intra-op threads split between them for the duration of the call: LAPACK's SVD gains
only ~1.5x from a second thread (its bidiagonalisation is memory-bound) while two single-threaded SVDs side by
side give ~1.65x, and each task's cache write overlaps the other's arithmetic (benchmarks/README.md).
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor, as_completed

import torch
from tqdm.auto import tqdm

from deftlab.decompose.cache import DecompositionCache
from deftlab.decompose.whiten import Decomposition, cholesky_factor, whitened_svd

log = logging.getLogger(__name__)


def decompose_all(weights: dict[str, torch.Tensor], grams: dict[str, torch.Tensor] | None,
                  cache: DecompositionCache | None, *, progress: bool = True,
                  workers: int | None = None, shard: tuple[int, int] | None = None) -> dict[str, Decomposition]:
    """Decomposition of every weight (whitened with its Gram when `grams` is given), from the cache when valid.

    Matrices that read the same Gram (q/k/v, gate/up) form one task sharing one Cholesky factor. On CPU the tasks
    run on ``workers`` threads (default 2 when torch has at least 2 intra-op threads), torch's threads split
    between them for the duration of the call: LAPACK's SVD gains only ~1.5× from a second thread (its
    bidiagonalisation is memory-bound) while two single-threaded SVDs side by side give ~1.65×, and each task's
    cache write overlaps the other's arithmetic (benchmarks/README.md). On a GPU the tasks run one at a time.
    If a task fails, the tasks not yet started are cancelled, the running ones finish, and everything written
    so far is indexed, so a rerun recomputes only what is missing.

    shard=(i, n): this process computes only the i-th of n interleaved parts of the tasks (whole Gram-sharing
    groups, in the weights' order) and returns those; n processes with one cache fill it together (its index
    merges under a file lock), and a later call without a shard finds every entry there."""
    out: dict[str, Decomposition] = {}
    groups: dict[int, list[str]] = {}  # one task per shared Gram (each matrix alone for plain SVD)
    mine = list(weights)  # the matrices this call decomposes
    if shard is not None:
        i, n = shard
        if not 0 <= i < n:
            raise ValueError(f"shard {i} of {n}")
        order: dict[int, int] = {}  # task (shared Gram) -> its position, so a group never splits across shards
        for name in weights:
            order.setdefault(id(weights[name]) if grams is None else id(grams[name]), len(order))
        mine = [nm for nm in mine if order[id(weights[nm]) if grams is None else id(grams[nm])] % n == i]
    for name in mine:
        dec = cache.get(name) if cache is not None else None
        if dec is not None:
            out[name] = dec
        else:
            groups.setdefault(id(weights[name]) if grams is None else id(grams[name]), []).append(name)

    def task(names: list[str]) -> list[tuple[str, Decomposition]]:
        gram = None if grams is None else grams[names[0]]
        chol = None if gram is None else cholesky_factor(gram)
        done = []
        for name in names:
            dec = whitened_svd(weights[name].detach(), gram, cholesky=chol)
            if dec.jitter:
                log.info("%s: Gram not positive definite, added jitter %.3g", name, dec.jitter)
            if cache is not None:
                cache.put(name, dec)
            done.append((name, dec))
        return done

    threads = torch.get_num_threads()
    on_cpu = all(w.device.type == "cpu" for w in weights.values())
    if workers is None:
        workers = 2 if on_cpu and threads >= 2 else 1
    workers = max(1, min(workers, len(groups)))
    bar = tqdm(total=len(mine), initial=len(out), desc="decompose", disable=not progress, unit="mat")
    try:
        if workers == 1:  # in this thread: a worker thread's OpenMP team runs LAPACK ~1.7x slower here
            for names in groups.values():
                done = task(names)
                out.update(done)
                bar.update(len(done))
        else:
            torch.set_num_threads(max(1, threads // workers))
            with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="decompose") as pool:
                futures = [pool.submit(task, names) for names in groups.values()]
                try:
                    for fut in as_completed(futures):
                        done = fut.result()
                        out.update(done)
                        bar.update(len(done))
                except BaseException:
                    for fut in futures:
                        fut.cancel()
                    raise
    finally:
        torch.set_num_threads(threads)
        bar.close()
        if cache is not None:
            cache.flush()  # also after a failure: the entries written so far stay usable
    return {name: out[name] for name in mine}
