"""The reward protocol, its output type, image conversion and the failure guard (registry: `registry.py`).

Why it looks like this:

- **One calling convention for every reward.** A reward is called as ``reward(images, prompts,
  metadata)`` on a whole batch and returns a :class:`RewardOutput`. In-process models, the
  programmatic ``shapes`` verifier and the HTTP client all obey it, so the trainer never knows which
  one it is talking to and the remote server can host any of them.
- **Failures are data, not silence.** A score that is NaN/inf, or a scoring call that raises, marks
  the affected samples invalid (``valid[i] = False``, ``scores[i] = nan``, ``reasons[i]`` says why).
  The trainer excludes invalid samples from their group's statistics and feeds every output into
  a :class:`RewardFailureGuard`, which raises :class:`RewardFailure` once too large a fraction of
  the run's samples were lost. Scores are NaN (not 0) where invalid so that a trainer that forgets
  the mask fails loudly instead of training on a made-up reward.
- **Plain weighted sum.** The reference (MAR-GRPO) sums raw reward scales with no normalisation;
  `registry.CompositeReward` does the same with explicit weights and logs every part.
- **No grad, batched, device-aware.** :meth:`Reward.__call__` runs :meth:`Reward.score_batch` under
  ``torch.no_grad()`` in chunks of ``batch_size`` on ``device``; results always come back as float32
  CPU tensors so they can be compared, logged and serialised without device juggling.
"""

from __future__ import annotations

import abc
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from PIL import Image

__all__ = [
    "ImageBatch",
    "RewardOutput",
    "RewardFn",
    "Reward",
    "RewardFailure",
    "RewardFailureGuard",
    "to_pil_images",
]

log = logging.getLogger(__name__)

#: A batch of images: a list of PIL images or of ``[C, H, W]`` tensors, or one ``[B, C, H, W]`` tensor.
#: Float tensors are in [-1, 1], the range margrpo's models produce (converted exactly as
#: :func:`margrpo.utils.images.to_pil` does); uint8 tensors are in [0, 255]. ``C`` is 1, 3 or 4.
ImageBatch = Sequence[Image.Image | torch.Tensor] | torch.Tensor

# What ``Reward.score_batch`` may return: scores, or scores plus sub-scores to log, optionally plus
# per-sample category labels.
ScoreResult = (
    torch.Tensor
    | tuple[torch.Tensor, Mapping[str, torch.Tensor]]
    | tuple[torch.Tensor, Mapping[str, torch.Tensor], Sequence[str]]
)


class RewardFailure(RuntimeError):
    """Too many samples lost to failed or non-finite rewards; the run must stop (after checkpointing).

    Attributes say how bad it was so the trainer can log them before re-raising.
    """

    def __init__(self, message: str, *, fraction: float, invalid: int, total: int,
                 reasons: Mapping[str, int] | None = None) -> None:
        super().__init__(message)
        self.fraction = fraction
        self.invalid = invalid
        self.total = total
        self.reasons = dict(reasons or {})


@dataclass
class RewardOutput:
    """What every reward returns for a batch of ``B`` samples.

    Attributes:
        scores: float32 ``[B]`` on CPU; ``nan`` exactly where ``valid`` is False.
        valid: bool ``[B]``; False for samples whose score failed or was not finite. Exclude them from
            group statistics.
        components: sub-scores to log, each float32 ``[B]`` (e.g. ``strict``/``partial`` for shapes,
            the weighted parts of a composite). Entries may be nan where a part did not apply.
        reasons: ``[B]`` strings saying why a sample is invalid (``None`` where valid).
        categories: optional ``[B]`` labels (e.g. the shapes task category) for per-category logging.
        elapsed_s: wall time spent scoring the batch.
    """

    scores: torch.Tensor
    valid: torch.Tensor
    components: dict[str, torch.Tensor] = field(default_factory=dict)
    reasons: list[str | None] = field(default_factory=list)
    categories: list[str] | None = None
    elapsed_s: float = 0.0

    def __post_init__(self) -> None:
        n = int(self.scores.shape[0]) if self.scores.dim() == 1 else -1
        if n < 0:
            raise ValueError(f"RewardOutput.scores must be 1-D [B], got shape {tuple(self.scores.shape)}")
        if tuple(self.valid.shape) != (n,) or self.valid.dtype != torch.bool:
            raise ValueError(f"RewardOutput.valid must be bool [{n}], got {self.valid.dtype} {tuple(self.valid.shape)}")
        if not self.reasons:
            self.reasons = [None] * n
        if len(self.reasons) != n:
            raise ValueError(f"RewardOutput.reasons has {len(self.reasons)} entries for {n} samples")
        for k, v in self.components.items():
            if tuple(v.shape) != (n,):
                raise ValueError(f"RewardOutput.components[{k!r}] must be [{n}], got {tuple(v.shape)}")
        if self.categories is not None and len(self.categories) != n:
            raise ValueError(f"RewardOutput.categories has {len(self.categories)} entries for {n} samples")

    def __len__(self) -> int:
        return int(self.scores.shape[0])

    @property
    def num_invalid(self) -> int:
        return int((~self.valid).sum())

    def summary(self, prefix: str = "reward") -> dict[str, float]:
        """Finite scalar metrics for logging: means over valid samples plus invalid counts.

        Means with no valid (or no finite) sample are left out rather than logged as nan, because
        the metrics writer rejects non-finite values by design.
        """
        out: dict[str, float] = {
            f"{prefix}/invalid_count": float(self.num_invalid),
            f"{prefix}/invalid_fraction": self.num_invalid / max(len(self), 1),
        }

        def _mean(key: str, t: torch.Tensor, mask: torch.Tensor) -> None:
            sel = t[mask & torch.isfinite(t)]
            if sel.numel():
                out[key] = float(sel.double().mean())

        _mean(f"{prefix}/mean", self.scores, self.valid)
        sel = self.scores[self.valid]
        if sel.numel() > 1:
            out[f"{prefix}/std"] = float(sel.double().std())
        for k, v in self.components.items():
            _mean(f"{prefix}/{k}", v, self.valid)
        if self.categories is not None:
            for cat in sorted(set(self.categories)):
                m = torch.tensor([c == cat for c in self.categories], dtype=torch.bool)
                _mean(f"{prefix}/by_category/{cat}", self.scores, self.valid & m)
        return out

    def reason_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for r in self.reasons:
            if r is not None:
                key = r.split(":", 1)[0]
                counts[key] = counts.get(key, 0) + 1
        return counts

    @staticmethod
    def concat(outputs: Sequence[RewardOutput]) -> RewardOutput:
        """Join chunk outputs in order (components missing from a chunk are filled with nan)."""
        if not outputs:
            return RewardOutput(torch.zeros(0), torch.zeros(0, dtype=torch.bool))
        keys: list[str] = []
        for o in outputs:
            keys += [k for k in o.components if k not in keys]
        comps = {
            k: torch.cat([o.components.get(k, torch.full((len(o),), math.nan)) for o in outputs]) for k in keys
        }
        cats = None
        if any(o.categories is not None for o in outputs):
            cats = [c for o in outputs for c in (o.categories or [""] * len(o))]
        return RewardOutput(
            scores=torch.cat([o.scores for o in outputs]),
            valid=torch.cat([o.valid for o in outputs]),
            components=comps,
            reasons=[r for o in outputs for r in o.reasons],
            categories=cats,
            elapsed_s=sum(o.elapsed_s for o in outputs),
        )


@runtime_checkable
class RewardFn(Protocol):
    """The calling convention every reward (local, composite or remote) satisfies."""

    name: str

    def __call__(self, images: ImageBatch, prompts: Sequence[str],
                 metadata: Sequence[Mapping[str, Any]] | None = None) -> RewardOutput: ...


def _tensor_to_pil(t: torch.Tensor, index: int) -> tuple[Image.Image, str | None]:
    """One ``[C, H, W]`` tensor to an RGB PIL image: ``((x.clamp(-1, 1) + 1) * 127.5).round()`` for floats.

    Non-finite pixels cannot be scored meaningfully: the sample is reported invalid (second return)
    and a black image of the right size stands in so the batch keeps its shape.
    """
    if t.dim() != 3 or t.shape[0] not in (1, 3, 4):
        raise ValueError(f"image {index}: expected a [C, H, W] tensor with C in (1, 3, 4), got {tuple(t.shape)}")
    t = t.detach().to("cpu")
    reason = None
    if t.dtype == torch.uint8:
        arr = t
    else:
        t = t.float()
        if not bool(torch.isfinite(t).all()):
            reason = "nonfinite_image: input image tensor has nan/inf pixels"
            t = torch.zeros_like(t)
        arr = ((t.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    arr_np = arr.permute(1, 2, 0).numpy()
    if arr_np.shape[2] == 1:
        img = Image.fromarray(arr_np[:, :, 0], mode="L").convert("RGB")
    elif arr_np.shape[2] == 4:
        img = Image.fromarray(arr_np, mode="RGBA").convert("RGB")
    else:
        img = Image.fromarray(np.ascontiguousarray(arr_np), mode="RGB")
    return img, reason


def to_pil_images(images: ImageBatch) -> tuple[list[Image.Image], list[str | None]]:
    """Normalise any :data:`ImageBatch` to RGB PIL images; also return per-image invalidity reasons.

    Every reward in the reference works on PIL images (rewards are computed on the decoded 8-bit
    picture a user would see), so all rewards get PIL images, whatever the sampler produced.
    """
    if isinstance(images, torch.Tensor):
        if images.dim() != 4:
            raise ValueError(f"a batched image tensor must be [B, C, H, W], got shape {tuple(images.shape)}")
        items: Sequence[Any] = list(images.unbind(0))
    else:
        items = images
    pils: list[Image.Image] = []
    reasons: list[str | None] = []
    for i, im in enumerate(items):
        if isinstance(im, Image.Image):
            pils.append(im if im.mode == "RGB" else im.convert("RGB"))
            reasons.append(None)
        elif isinstance(im, torch.Tensor):
            p, r = _tensor_to_pil(im, i)
            pils.append(p)
            reasons.append(r)
        elif isinstance(im, np.ndarray):
            p, r = _tensor_to_pil(torch.from_numpy(np.ascontiguousarray(im)).permute(2, 0, 1), i)
            pils.append(p)
            reasons.append(r)
        else:
            raise TypeError(f"image {i}: expected PIL.Image or torch.Tensor, got {type(im).__name__}")
    return pils, reasons


def _check_batch(n: int, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]] | None
                 ) -> list[dict[str, Any]]:
    if isinstance(prompts, str):
        raise TypeError("prompts must be a sequence of strings (one per image), got a single str")
    if len(prompts) != n:
        raise ValueError(f"got {n} images but {len(prompts)} prompts; pass one prompt per image")
    if metadata is None:
        return [{} for _ in range(n)]
    if len(metadata) != n:
        raise ValueError(f"got {n} images but {len(metadata)} metadata entries; pass one dict per image")
    return [dict(m) for m in metadata]


class Reward(abc.ABC):
    """Base class: subclasses implement :meth:`score_batch`; this class does the bookkeeping.

    ``__call__`` converts inputs to PIL, splits the batch into chunks of ``batch_size``, calls
    :meth:`score_batch` under ``torch.no_grad()``, converts to float32 CPU, flags non-finite scores,
    and (if ``catch_errors``) turns an exception in a chunk into invalid samples whose reason names
    the exception, so one bad batch costs samples rather than the run.

    Args:
        device: where model-based rewards run (``"cpu"``, ``"cuda:0"``, a ``torch.device``).
        dtype: compute dtype for model-based rewards (features are compared in float32 regardless).
        batch_size: largest chunk passed to the model at once (memory bound, not a semantic choice).
        catch_errors: turn scoring exceptions into invalid samples (True, the training default) or
            re-raise them (False, useful while debugging a reward).
    """

    #: Registry name; subclasses set it (``register_reward`` does too).
    name: str = "reward"

    def __init__(self, *, device: str | torch.device = "cpu", dtype: torch.dtype | str = torch.float32,
                 batch_size: int = 32, catch_errors: bool = True) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = torch.device(device)
        self.dtype = _as_dtype(dtype)
        self.batch_size = int(batch_size)
        self.catch_errors = bool(catch_errors)

    @abc.abstractmethod
    def score_batch(self, images: list[Image.Image], prompts: list[str],
                    metadata: list[dict[str, Any]]) -> ScoreResult:
        """Score one chunk; return ``[n]`` scores or ``([n] scores, {name: [n] sub-scores})``.

        Return nan for an individual sample that could not be scored; raise for a whole-chunk failure.
        """

    def to(self, device: str | torch.device) -> Reward:
        """Move model weights (subclasses with modules override :meth:`_move`)."""
        self.device = torch.device(device)
        self._move()
        return self

    def _move(self) -> None:  # noqa: B027 - optional hook, default no-op for model-free rewards
        """Hook for subclasses holding modules."""

    def describe(self) -> dict[str, Any]:
        """What to print/log about this reward (the server returns it from ``/health``)."""
        return {"name": self.name, "class": type(self).__name__, "device": str(self.device)}

    def __call__(self, images: ImageBatch, prompts: Sequence[str],
                 metadata: Sequence[Mapping[str, Any]] | None = None) -> RewardOutput:
        t0 = time.perf_counter()
        pils, pre_reasons = to_pil_images(images)
        meta = _check_batch(len(pils), prompts, metadata)
        chunks = []
        for s in range(0, len(pils), self.batch_size):
            e = min(s + self.batch_size, len(pils))
            chunks.append(self._score_chunk(pils[s:e], list(prompts[s:e]), meta[s:e], pre_reasons[s:e]))
        out = RewardOutput.concat(chunks)
        out.elapsed_s = time.perf_counter() - t0
        return out

    def _score_chunk(self, images: list[Image.Image], prompts: list[str], meta: list[dict[str, Any]],
                     pre_reasons: list[str | None]) -> RewardOutput:
        n = len(images)
        try:
            with torch.no_grad():
                result = self.score_batch(images, prompts, meta)
            scores, comps, cats = _unpack(result, n, self.name)
        except Exception as exc:  # noqa: BLE001 - recorded per sample, surfaced by RewardFailureGuard
            if not self.catch_errors:
                raise
            log.warning("reward %s failed on a chunk of %d samples: %s: %s", self.name, n, type(exc).__name__, exc)
            msg = f"error: {self.name}: {type(exc).__name__}: {exc}"
            return RewardOutput(torch.full((n,), math.nan), torch.zeros(n, dtype=torch.bool), reasons=[msg] * n)
        finite = torch.isfinite(scores)
        pre_ok = torch.tensor([r is None for r in pre_reasons], dtype=torch.bool)
        valid = finite & pre_ok
        reasons: list[str | None] = []
        for i in range(n):
            if pre_reasons[i] is not None:
                reasons.append(pre_reasons[i])
            elif not bool(finite[i]):
                reasons.append(f"nonfinite: {self.name} returned {float(scores[i])}")
            else:
                reasons.append(None)
        scores = torch.where(valid, scores, torch.full_like(scores, math.nan))
        return RewardOutput(scores, valid, comps, reasons, cats)


def _unpack(result: Any, n: int, name: str
            ) -> tuple[torch.Tensor, dict[str, torch.Tensor], list[str] | None]:
    """Validate and normalise what ``score_batch`` returned (shape ``[n]``, float32 on CPU)."""
    comps: Mapping[str, Any] = {}
    cats = None
    if isinstance(result, tuple):
        if len(result) == 3:
            result, comps, cats = result
        else:
            result, comps = result
    scores = torch.as_tensor(result).detach().to("cpu", torch.float32).reshape(-1)
    if scores.shape[0] != n:
        raise ValueError(f"reward {name!r} returned {scores.shape[0]} scores for {n} samples")
    out_comps = {}
    for k, v in comps.items():
        t = torch.as_tensor(v).detach().to("cpu", torch.float32).reshape(-1)
        if t.shape[0] != n:
            raise ValueError(f"reward {name!r} sub-score {k!r} has {t.shape[0]} entries for {n} samples")
        out_comps[k] = t
    return scores, out_comps, (list(cats) if cats is not None else None)


def _as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    table = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if dtype not in table:
        raise ValueError(f"dtype {dtype!r} is not one of {sorted(table)}")
    return table[dtype]


class RewardFailureGuard:
    """Counts invalid samples over a run and raises :class:`RewardFailure` past a set fraction.

    The trainer calls :meth:`update` with every :class:`RewardOutput`; on :class:`RewardFailure` it
    saves its checkpoint and stops. ``min_samples`` keeps one unlucky first batch from ending a run;
    a batch in which *every* sample failed counts like any other (a dead server quickly exceeds any
    sensible fraction).

    Args:
        max_invalid_fraction: stop once ``invalid / total`` over the run exceeds this (0 <= f < 1).
        min_samples: do not judge before this many samples have been seen.
    """

    def __init__(self, max_invalid_fraction: float = 0.05, min_samples: int = 64) -> None:
        if not 0.0 <= max_invalid_fraction < 1.0:
            raise ValueError(f"max_invalid_fraction must be in [0, 1), got {max_invalid_fraction}")
        self.max_invalid_fraction = float(max_invalid_fraction)
        self.min_samples = int(min_samples)
        self.total = 0
        self.invalid = 0
        self.reasons: dict[str, int] = {}
        self.last_reason: str | None = None

    @property
    def fraction(self) -> float:
        return self.invalid / self.total if self.total else 0.0

    def update(self, output: RewardOutput) -> None:
        """Count `output`; past the fraction raise, with the counts put back as they were before it.

        Why put back: the trainer checkpoints the step before the failing batch and stops; a resume (with the
        reward fixed) repeats that step, which must not count its failed batch a second time."""
        before = (self.total, self.invalid, dict(self.reasons), self.last_reason)
        self.total += len(output)
        self.invalid += output.num_invalid
        for k, v in output.reason_counts().items():
            self.reasons[k] = self.reasons.get(k, 0) + v
        for r in output.reasons:
            if r is not None:
                self.last_reason = r
        if self.total >= self.min_samples and self.fraction > self.max_invalid_fraction:
            failure = RewardFailure(
                f"{self.invalid} of {self.total} reward samples ({self.fraction:.1%}) were invalid, more than "
                f"the allowed max_invalid_fraction={self.max_invalid_fraction:.1%}; by cause: {self.reasons}; "
                f"last: {self.last_reason}",
                fraction=self.fraction, invalid=self.invalid, total=self.total, reasons=self.reasons,
            )
            self.total, self.invalid, self.reasons, self.last_reason = before
            raise failure

    def metrics(self, prefix: str = "reward") -> dict[str, float]:
        return {f"{prefix}/run_invalid_count": float(self.invalid), f"{prefix}/run_invalid_fraction": self.fraction}

    def state_dict(self) -> dict[str, Any]:
        """JSON-able state so a resumed run keeps counting from where it stopped."""
        return {"total": self.total, "invalid": self.invalid, "reasons": dict(self.reasons)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.total = int(state["total"])
        self.invalid = int(state["invalid"])
        self.reasons = {str(k): int(v) for k, v in dict(state.get("reasons", {})).items()}
