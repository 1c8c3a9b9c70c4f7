"""Batches of (input, target) windows from a token memmap.

A window is ``block_size + 1`` consecutive tokens; ``x = window[:-1]`` and ``y = window[1:]``,
so ``y[b, t]`` is the token that follows ``x[b, t]``. Both are int64 tensors of shape (B, T).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from ..errors import UserError


def _to_device(window: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T+1) int tokens -> x, y of shape (B, T), int64, on ``device``.

    On CUDA the batch goes through pinned memory with a non-blocking copy, so the transfer
    overlaps with the GPU still working on the previous step.
    """
    w = torch.from_numpy(window.astype(np.int64))  # (B, T+1)
    x, y = w[:, :-1].contiguous(), w[:, 1:].contiguous()  # (B, T) each
    if device.type == "cuda":
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    if device.type != "cpu":
        return x.to(device), y.to(device)
    return x, y


class RandomBatchSampler:
    """Random windows from ``tokens``: seeded, a different slice on every rank, resumable exactly.

    Every rank draws the *global* batch's window starts from one shared numpy ``Generator``
    (seeded by ``SeedSequence(seed, spawn_key=(0,))``): ``world_size x batch_size`` starts per
    draw, of which rank ``r`` takes rows ``[r*B, (r+1)*B)``. So ``world_size`` ranks with batch
    ``B`` together see exactly the windows one process with batch ``world_size*B`` sees, in the
    same order: data-parallel training equals one process with the same global batch.

    ``state_dict()`` is plain JSON data (the generator's state and a batch counter) and is the
    same on every rank; ``load_state_dict()`` restores it on any rank, and the following batches
    are exactly those an uninterrupted run would have drawn (with the same global batch).
    """

    def __init__(self, tokens: np.ndarray, batch_size: int, block_size: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1, device: str | torch.device = "cpu"):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        if len(tokens) < block_size + 1:
            raise UserError(f"the split has {len(tokens)} tokens, fewer than block_size + 1 = "
                            f"{block_size + 1}; use more text or a smaller model.block_size")
        self.tokens = tokens
        self.batch_size = batch_size
        self.block_size = block_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.device = torch.device(device)
        self.batches_drawn = 0
        # One stream for all ranks (spawn key 0: a single process draws as it always did).
        self._rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed, spawn_key=(0,))))
        self._offsets = np.arange(block_size + 1)  # (T+1,)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """x, y: (batch_size, block_size) int64 on the sampler's device."""
        n_starts = len(self.tokens) - self.block_size  # a window starting at s ends at s + T + 1 <= n
        starts = self._rng.integers(0, n_starts, size=self.world_size * self.batch_size)  # (W*B,)
        starts = starts[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]  # (B,): this rank's rows
        window = self.tokens[starts[:, None] + self._offsets]  # (B, T+1)
        self.batches_drawn += 1
        return _to_device(np.asarray(window), self.device)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.next_batch()

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "global_batch_size": self.world_size * self.batch_size,
                "batches_drawn": self.batches_drawn, "bit_generator": self._rng.bit_generator.state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the shared stream; any rank may load the state that rank 0 saved.

        With a different global batch (``world_size x batch_size``) the stream continues, but
        the windows are no longer those of the original run.
        """
        self._rng.bit_generator.state = state["bit_generator"]
        self.batches_drawn = int(state.get("batches_drawn", 0))


def iter_sequential_batches(tokens: np.ndarray, batch_size: int, block_size: int, *,
                            device: str | torch.device = "cpu",
                            include_tail: bool = True) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Every token of ``tokens`` once, in order: non-overlapping windows for an exact loss.

    Window ``i`` is ``tokens[i*T : i*T + T + 1]``, so every token after the first is a target
    exactly once. Batches are (batch_size, T), the last full-window batch may have fewer rows,
    and the tail (the ``(n - 1) % T`` targets after the last full window) comes as one final
    (1, r) batch when ``include_tail``. Weight each batch's mean loss by ``y.numel()``: the
    weighted mean is the exact per-token loss, and ``exp`` of it the perplexity.
    """
    device = torch.device(device)
    n = len(tokens)
    n_windows = (n - 1) // block_size
    offsets = np.arange(block_size + 1)  # (T+1,)
    for first in range(0, n_windows, batch_size):
        starts = np.arange(first, min(first + batch_size, n_windows)) * block_size  # (b,)
        yield _to_device(np.asarray(tokens[starts[:, None] + offsets]), device)
    tail_start = n_windows * block_size
    if include_tail and n - tail_start > 1:
        yield _to_device(np.asarray(tokens[tail_start:n])[None, :], device)  # (1, r+1) -> (1, r)
