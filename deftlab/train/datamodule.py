"""A resumable LightningDataModule over a task's training examples, and its seeded batch sampler.

Examples are tokenised by `deftlab.tasks.encoding` (loss on the response only); an example left with no response
token is dropped and counted.

Shuffling is deterministic: the training subset is `tasks.splits.train_subset` (a `random.Random(seed)` sample),
and the order of epoch e is a permutation drawn from a generator seeded with seed + e. The DataModule saves (epoch, batches done) in every
checkpoint, so a resumed run continues from the next batch of the interrupted epoch instead of re-reading it.
"""

from __future__ import annotations

import math
from typing import Iterator

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Sampler

from deftlab.errors import DeftlabError
from deftlab.tasks import Task
from deftlab.tasks.encoding import IGNORE_INDEX, PaddingCollator, encode_example, pad_id_of
from deftlab.tasks.splits import train_subset


class SeededBatchSampler(Sampler[list[int]]):
    """Batches of a per-epoch permutation seeded by seed + epoch; can skip the batches already trained on.

    With `world` processes, process `rank` takes every world-th batch starting at its rank, so the processes'
    batches of one optimizer step are the very batches one process would accumulate for that step (the same
    examples, padded the same way); the last batches that would leave the processes unequal are dropped."""

    def __init__(self, n: int, batch_size: int, seed: int, shuffle: bool = True, rank: int = 0, world: int = 1):
        self.n, self.batch_size, self.seed, self.shuffle = n, batch_size, seed, shuffle
        if not 0 <= rank < world:
            raise DeftlabError(f"rank {rank} is not in [0, {world})")
        self.rank, self.world = rank, world
        self.epoch = 0
        self._skip: tuple[int, int] | None = None  # (epoch, batches) to skip once, after a resume

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def sampler(self) -> "SeededBatchSampler":
        # Lightning calls set_epoch on `dataloader.batch_sampler.sampler` at every epoch start, never on the
        # batch sampler itself; pointing at ourselves makes it reach set_epoch above.
        return self

    def resume_at(self, epoch: int, batches_done: int) -> None:
        self.epoch = epoch
        self._skip = (epoch, batches_done)

    def order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.n))
        g = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(self.n, generator=g).tolist()

    def __iter__(self) -> Iterator[list[int]]:
        order = self.order(self.epoch)
        start = 0
        if self._skip is not None and self._skip[0] == self.epoch:
            start = self._skip[1]
        self._skip = None
        for b in range(start, len(self)):
            g = b * self.world + self.rank  # the global batch this process takes
            yield order[g * self.batch_size : (g + 1) * self.batch_size]

    def __len__(self) -> int:
        """Batches this process takes per epoch."""
        return math.ceil(self.n / self.batch_size) // self.world


class TaskDataModule(pl.LightningDataModule):
    """Training data of any `Task` (arithmetic, XSum, MATH, text): tokenised once, dynamically padded."""

    def __init__(self, task: Task, tokenizer, *, cutoff_len: int = 256, micro_batch_size: int = 4,
                 limit: int | None = None, seed: int = 42, pad_to_multiple_of: int | None = None,
                 num_workers: int = 0):
        super().__init__()
        if cutoff_len < 2:
            raise DeftlabError(f"cutoff_len must be at least 2, got {cutoff_len}")
        if micro_batch_size < 1:
            raise DeftlabError(f"micro_batch_size must be positive, got {micro_batch_size}")
        self.task, self.tokenizer = task, tokenizer
        self.cutoff_len, self.micro_batch_size = cutoff_len, micro_batch_size
        self.limit, self.seed, self.num_workers = limit, seed, num_workers
        self.collator = PaddingCollator(pad_id_of(tokenizer), pad_to_multiple_of)
        self.train_set: list[dict] | None = None
        self.stats: dict = {}
        self._resume: dict | None = None
        self._sampler: SeededBatchSampler | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        examples = self.task.train_examples()
        if not examples:
            raise DeftlabError(f"task '{self.task.name}' has no training examples", "check its data")
        examples = [examples[i] for i in train_subset(len(examples), self.limit, self.seed)]
        encoded = [encode_example(self.tokenizer, ex, self.cutoff_len) for ex in examples]
        self.train_set = [e for e in encoded if e is not None]
        if not self.train_set:
            raise DeftlabError(f"every example lost its response to cutoff_len={self.cutoff_len}",
                               "raise cutoff_len")
        lengths = [len(e["input_ids"]) for e in self.train_set]
        self.stats = {"examples": len(self.train_set), "dropped_no_response": len(encoded) - len(self.train_set),
                      "truncated": sum(n == self.cutoff_len for n in lengths),
                      "tokens": sum(lengths), "supervised_tokens": sum(
                          sum(lab != IGNORE_INDEX for lab in e["labels"]) for e in self.train_set)}

    def train_dataloader(self) -> DataLoader:
        self.setup()
        trainer = getattr(self, "trainer", None)
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        self._sampler = SeededBatchSampler(len(self.train_set), self.micro_batch_size, self.seed, rank=rank,
                                           world=world)
        if self._resume:  # kept: Lightning may build the loader twice (step estimate, then training)
            self._sampler.resume_at(self._resume["epoch"], self._resume["batches_done"])
        return DataLoader(self.train_set, batch_sampler=self._sampler, collate_fn=self.collator,
                          num_workers=self.num_workers)

    # --- resume: Lightning stores these in every checkpoint -------------------------------------------------
    def state_dict(self) -> dict:
        trainer = getattr(self, "trainer", None)
        if trainer is None or self._sampler is None:
            return {}
        ep = trainer.fit_loop.epoch_progress.current
        if ep.started > ep.completed:  # inside epoch `started - 1`
            epoch = ep.started - 1
            # batches of this epoch whose step ran (checkpoints are written in on_train_batch_end)
            done = trainer.fit_loop.epoch_loop.batch_progress.current.processed
            if done >= len(self._sampler):
                epoch, done = epoch + 1, 0
        else:  # between epochs, or training finished
            epoch, done = ep.completed, 0
        return {"epoch": int(epoch), "batches_done": int(done), "seed": self.seed, "examples": len(self.train_set)}

    def load_state_dict(self, state: dict) -> None:
        if not state:
            return
        self.setup()
        if state.get("seed") != self.seed or state.get("examples") != len(self.train_set):
            raise DeftlabError("the checkpoint was written with different training data or seed",
                               "use a new run directory, or the original preset")
        self._resume = {"epoch": state["epoch"], "batches_done": state["batches_done"]}
