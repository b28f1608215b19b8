"""DataLoaders for one split, seeded so that the same seed gives the same batches, also when the
augmentation runs in-process."""

from __future__ import annotations

import os
import random
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from .common import DataError
from .synthetic import _SyntheticDataset


def make_loader(
    dataset: Dataset,
    batch_size: int,
    train: bool,
    workers: int | None = None,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> DataLoader:
    """A DataLoader for one split: train shuffles (seeded) and drops the last partial batch.

    `workers` defaults to 0 for the in-memory synthetic data (worker processes only add IPC cost
    there) and to min(4, cores - 1) for file-backed data. Augmentation randomness is seeded from
    `seed` too, also in-process (workers=0), so the same seed gives the same batches.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise DataError(f"make_loader: batch_size {batch_size!r} is invalid; accepted: an int >= 1")
    if workers is None:
        workers = 0 if _in_memory(dataset) else min(4, max(0, _cpu_count() - 1))
    if workers < 0:
        raise DataError(f"make_loader: workers {workers!r} is invalid; accepted: an int >= 0 or None")
    device = torch.device(device)
    generator = torch.Generator()
    generator.manual_seed(seed)
    return _SeededLoader(
        dataset,
        batch_size=batch_size,
        shuffle=train,
        drop_last=train,
        num_workers=workers,
        pin_memory=device.type == "cuda" and torch.cuda.is_available(),
        persistent_workers=workers > 0,
        generator=generator,
    )


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))  # the cores this process may use (containers, taskset)
    except AttributeError:
        return os.cpu_count() or 1


def _in_memory(dataset: Dataset) -> bool:
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    return isinstance(dataset, _SyntheticDataset)


class _SeededLoader(DataLoader):
    """A DataLoader whose in-process augmentation draws from its own seeded RNG stream.

    Worker processes are seeded from the loader's generator by PyTorch; with workers=0 the
    transforms would instead consume (and depend on) the training loop's global RNG. Here each
    epoch draws a data seed from the generator and the global torch/python/numpy RNG states are
    swapped in only while a batch is being fetched.
    """

    def __iter__(self) -> Iterator:
        batches = super().__iter__()
        if self.num_workers > 0:
            return batches
        seed = int(torch.randint(2**62, (), generator=self.generator))
        return _isolated(batches, seed)


def _isolated(batches: Iterator, seed: int) -> Iterator:
    torch_state = torch.Generator().manual_seed(seed).get_state()
    py_state = random.Random(seed).getstate()
    np_state = np.random.RandomState(seed % 2**32).get_state()
    while True:
        saved = torch.get_rng_state(), random.getstate(), np.random.get_state()
        torch.set_rng_state(torch_state)
        random.setstate(py_state)
        np.random.set_state(np_state)
        try:
            batch = next(batches)
        except StopIteration:
            return
        finally:
            torch_state, py_state, np_state = torch.get_rng_state(), random.getstate(), np.random.get_state()
            torch.set_rng_state(saved[0])
            random.setstate(saved[1])
            np.random.set_state(saved[2])
        yield batch
