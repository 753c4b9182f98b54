"""Overlap reward scoring with sampling: score batch k in the background while batch k+1 is sampled.

A trainer does::

    scorer = AsyncRewardScorer(reward)              # any RewardFn: in-process, composite or remote
    fut = scorer.submit(images, prompts, metadata)  # returns at once
    ...sample the next batch...
    out = fut.result()                              # RewardOutput, identical to reward(images, ...)

Why a thread is enough: remote scoring waits on a socket and in-process models release the GIL in
their kernels. ``submit`` snapshots tensor inputs (detached CPU copies) before returning, because the
sampler may reuse its buffers for the next batch; that is the only thing it does synchronously, so
results are exactly those of the synchronous call. ``max_pending`` bounds how many batches can be in
flight, so a slow reward applies back-pressure instead of piling images up in memory.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch
from PIL import Image

from .base import ImageBatch, RewardFn, RewardOutput

__all__ = ["AsyncRewardScorer"]


def _snapshot(images: ImageBatch) -> ImageBatch:
    if isinstance(images, torch.Tensor):
        return images.detach().to("cpu", copy=True)
    return [im.detach().to("cpu", copy=True) if isinstance(im, torch.Tensor) else
            (im.copy() if isinstance(im, Image.Image) else im) for im in images]


class AsyncRewardScorer:
    """Future-based wrapper around a reward.

    Args:
        reward: the reward to call.
        max_workers: concurrent scoring calls (1 keeps batches in order and one model busy at a time).
        max_pending: most submitted-but-unfinished batches; ``submit`` blocks beyond it.
    """

    def __init__(self, reward: RewardFn, *, max_workers: int = 1, max_pending: int = 2) -> None:
        if max_workers < 1 or max_pending < 1:
            raise ValueError(f"max_workers and max_pending must be >= 1, got {max_workers}, {max_pending}")
        self.reward = reward
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="reward")
        self._slots = threading.BoundedSemaphore(max_pending)
        self._closed = False

    def submit(self, images: ImageBatch, prompts: Sequence[str],
               metadata: Sequence[Mapping[str, Any]] | None = None) -> Future[RewardOutput]:
        """Start scoring; the future's result is what ``reward(images, prompts, metadata)`` returns
        (or raises)."""
        if self._closed:
            raise RuntimeError("AsyncRewardScorer is closed")
        snap = _snapshot(images)
        prompts = list(prompts)
        meta = [dict(m) for m in metadata] if metadata is not None else None
        self._slots.acquire()
        try:
            fut = self._pool.submit(self.reward, snap, prompts, meta)
        except BaseException:
            self._slots.release()
            raise
        fut.add_done_callback(lambda _f: self._slots.release())
        return fut

    def score(self, images: ImageBatch, prompts: Sequence[str],
              metadata: Sequence[Mapping[str, Any]] | None = None) -> RewardOutput:
        """Synchronous convenience: ``submit(...).result()``."""
        return self.submit(images, prompts, metadata).result()

    def close(self, wait: bool = True) -> None:
        self._closed = True
        self._pool.shutdown(wait=wait, cancel_futures=not wait)

    def __enter__(self) -> AsyncRewardScorer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
