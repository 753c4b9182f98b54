"""A model at its best sampler settings: a guidance x temperature grid, the setting chosen on training prompts.

Why: the sampler alone moves held-out accuracy as much as RL does (guidance 3 and temperature 0.5 raise the
shipped base by about 10 points), so a gain is honest only when it is also measured against the base at its best
settings, with the trained model at its own best. The setting is chosen on training prompts (fresh seeds), never
on held-out ones: the maximum over nine noisy held-out scores is biased upward, while the held-out score of a
setting chosen on other prompts and other images is not.

The base model's grid is the same in every run on one machine, so `cached_grid` stores it in the result cache
(`margrpo.utils.result_cache`, `~/.cache/margrpo/sampler-grid/` by default) under a key that names everything
that determines it: the model files' digest, the sampler settings, the grid, each split's prompts and image seed,
the evaluation batch size, the torch and numpy versions, the device and thread count, and a digest of the code
that samples, draws the evaluation sets and scores (`CODE_FILES`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from margrpo.models.base import ImageModel
from margrpo.sampling.config import SamplerConfig
from margrpo.utils import result_cache
from margrpo.worlds.shapes.evaluate import EvalResult, EvalSet, evaluate_set, strict_accuracy

GUIDANCES: tuple[float, ...] = (1.0, 2.0, 3.0)
TEMPERATURES: tuple[float, ...] = (1.0, 0.7, 0.5)
SELECTION_SPLIT = "train"  # the only split a setting is chosen on
CACHE_KIND = "sampler-grid"
CACHE_FORMAT = 1  # bump when what a grid entry holds changes
EVAL_BATCH_SIZE = 64  # evaluate()'s batch size: the image seeds are per batch, so it is part of the key


@dataclass(frozen=True)
class SamplerSetting:
    """One point of the grid: a guidance scale and a temperature (the rest of the sampler stays as given)."""

    guidance_scale: float
    temperature: float

    def applied(self, sampler: SamplerConfig) -> SamplerConfig:
        return dataclasses.replace(sampler, guidance_scale=self.guidance_scale, temperature=self.temperature)

    @property
    def label(self) -> str:
        return f"guidance {self.guidance_scale:g}, temperature {self.temperature:g}"

    @classmethod
    def of(cls, sampler: SamplerConfig) -> SamplerSetting:
        return cls(float(sampler.guidance_scale), float(sampler.temperature))


def grid_settings(guidances: Sequence[float] = GUIDANCES,
                  temperatures: Sequence[float] = TEMPERATURES) -> list[SamplerSetting]:
    """Every (guidance, temperature) pair, guidance-major, in the order given."""
    if not guidances or not temperatures:
        raise ValueError("a sampler grid needs at least one guidance scale and one temperature")
    for g in guidances:
        if not 1.0 <= g <= 50.0:
            raise ValueError(f"guidance scale {g} is out of range: must be in [1, 50] (1 = no guidance)")
    for t in temperatures:
        if not 0.01 <= t <= 10.0:
            raise ValueError(f"temperature {t} is out of range: must be in [0.01, 10]")
    settings = [SamplerSetting(float(g), float(t)) for g in guidances for t in temperatures]
    if len(set(settings)) != len(settings):
        raise ValueError(f"the sampler grid repeats a setting: guidances {list(guidances)}, temperatures "
                         f"{list(temperatures)}")
    return settings


def choose_setting(settings: Sequence[SamplerSetting], selection: Sequence[EvalResult]) -> SamplerSetting:
    """The setting with the highest overall strict accuracy on the selection results (training prompts); a tie
    goes to the earlier setting in grid order."""
    if len(settings) != len(selection) or not settings:
        raise ValueError(f"{len(settings)} settings but {len(selection)} selection results")
    scores = [r.summary["overall"]["strict"] for r in selection]
    return settings[int(np.argmax(scores))]  # argmax takes the first maximum


@dataclass
class SamplerGrid:
    """Verifier results of one model at every setting of a grid, per evaluation split."""

    settings: list[SamplerSetting]
    results: dict[str, list[EvalResult]]  # split -> one result per setting, in the settings' order
    seconds: dict[str, list[float]]  # split -> sampling and scoring time per setting, when it was computed
    cpu_seconds: float = 0.0  # this process's CPU time for the whole grid (wall time on a shared machine overstates)
    cache_path: Path | None = None  # the cache entry this grid was read from or written to
    from_cache: bool = False

    def chosen(self) -> SamplerSetting:
        """The best setting on training prompts (`choose_setting`); held-out results are never read here."""
        if SELECTION_SPLIT not in self.results:
            raise ValueError(f"a sampler grid chooses on the {SELECTION_SPLIT!r} split, which this grid lacks "
                             f"(splits: {', '.join(self.results)})")
        return choose_setting(self.settings, self.results[SELECTION_SPLIT])

    def result(self, split: str, setting: SamplerSetting) -> EvalResult:
        if split not in self.results:
            raise KeyError(f"the sampler grid has no {split!r} split (splits: {', '.join(self.results)})")
        if setting not in self.settings:
            raise KeyError(f"{setting.label} is not in the sampler grid")
        return self.results[split][self.settings.index(setting)]

    def total_seconds(self) -> float:
        return float(sum(sum(v) for v in self.seconds.values()))

    def table(self) -> str:
        """Markdown: one row per setting, strict accuracy ± its clustered s.e. per split; the chosen row marked."""
        splits = [s for s in (SELECTION_SPLIT, "heldout") if s in self.results]
        splits += [s for s in self.results if s not in splits]
        names = {"train": "training prompts (chooses)", "heldout": "held-out"}
        chosen = self.chosen() if SELECTION_SPLIT in self.results else None
        lines = ["| guidance | temperature | " + " | ".join(names.get(s, s) for s in splits) + " | |",
                 "|---:|---:|" + "---:|" * len(splits) + "---|"]
        for k, st in enumerate(self.settings):
            cells = []
            for s in splits:
                acc, se = strict_accuracy(self.results[s][k])["overall"]
                cells.append(f"{100 * acc:.1f}% ± {100 * se:.1f}")
            mark = "chosen" if st == chosen else ""
            lines.append(f"| {st.guidance_scale:g} | {st.temperature:g} | " + " | ".join(cells) + f" | {mark} |")
        return "\n".join(lines)

    def source(self) -> str:
        """Where the figures come from: the cache entry, or how long computing them took."""
        # the entry's file name, not its folder: the path is one machine's, and the text goes into shared documents
        if self.from_cache:
            return f"read from the result cache (entry {self.cache_path.name})"
        where = f", cached as result-cache entry {self.cache_path.name}" if self.cache_path is not None else ""
        return f"computed in {self.total_seconds():.0f}s ({self.cpu_seconds:.0f}s of CPU){where}"

    def report(self) -> str:
        """The grid table, the setting chosen on training prompts and the held-out table at that setting."""
        from margrpo.worlds.shapes.evaluate import format_summary

        n = len(next(iter(self.results.values()))[0].prompts)
        text = (f"Strict accuracy ± s.e. (clustered by prompt), {n} images per split and setting "
                f"({self.source()}):\n\n{self.table()}\n")
        if "heldout" in self.results and SELECTION_SPLIT in self.results:
            best = self.chosen()
            held = self.result("heldout", best)
            acc, se = strict_accuracy(held)["overall"]
            text += (f"\nChosen on training prompts: {best.label}; held-out strict accuracy there "
                     f"{100 * acc:.1f}% ± {100 * se:.1f}\n\n{format_summary(held.summary, strict_accuracy(held))}\n")
        return text

    def to_json(self) -> dict:
        return {"settings": [dataclasses.asdict(s) for s in self.settings],
                "results": {split: [r.to_json() for r in rs] for split, rs in self.results.items()},
                "seconds": self.seconds, "cpu_seconds": self.cpu_seconds}

    @classmethod
    def from_json(cls, data: dict) -> SamplerGrid:
        settings = [SamplerSetting(float(s["guidance_scale"]), float(s["temperature"])) for s in data["settings"]]
        results = {split: [EvalResult.from_json(r) for r in rs] for split, rs in data["results"].items()}
        if any(len(rs) != len(settings) for rs in results.values()):
            raise ValueError("a sampler grid record holds a different number of results than settings")
        return cls(settings, results, {k: [float(x) for x in v] for k, v in data["seconds"].items()},
                   float(data.get("cpu_seconds", 0.0)))


def run_grid(model: ImageModel, sets: dict[str, EvalSet], sampler: SamplerConfig,
             settings: Sequence[SamplerSetting], progress: bool = True) -> SamplerGrid:
    """Evaluate `model` on every split of `sets` at every setting (the rest of `sampler` as given)."""
    from tqdm.auto import tqdm

    results: dict[str, list[EvalResult]] = {s: [] for s in sets}
    seconds: dict[str, list[float]] = {s: [] for s in sets}
    jobs = [(split, st) for st in settings for split in sets]
    cpu0 = time.process_time()
    for split, st in tqdm(jobs, desc="sampler grid", disable=not progress, leave=False):
        t0 = time.perf_counter()
        res = evaluate_set(model, sets[split], st.applied(sampler), progress=False)
        res.images = None  # nine settings' images would hold memory that nothing reads
        results[split].append(res)
        seconds[split].append(time.perf_counter() - t0)
    return SamplerGrid(list(settings), results, seconds, time.process_time() - cpu0)


# the sources that decide what a sampled image looks like, which prompts and seeds are drawn, and how it scores
CODE_FILES = ("models/**/*.py", "sampling/**/*.py", "worlds/shapes/spec.py", "worlds/shapes/prompts.py",
              "worlds/shapes/render.py", "worlds/shapes/detection.py", "worlds/shapes/verifier.py",
              "worlds/shapes/evaluate.py", "utils/rng.py")


def code_digest() -> str:
    """SHA-256 of `CODE_FILES` below the margrpo package (a change there makes every cached grid a miss)."""
    import margrpo

    root = Path(margrpo.__file__).resolve().parent
    h = hashlib.sha256()
    for path in sorted({p for pattern in CODE_FILES for p in root.glob(pattern)}):
        h.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def grid_cache_key(model_digest: str, sets: dict[str, EvalSet], sampler: SamplerConfig,
                   settings: Sequence[SamplerSetting], device: torch.device | str) -> dict:
    """Everything that determines a grid's results (module docstring)."""
    varying = {"guidance_scale", "temperature"}  # set per setting
    return {
        "format": CACHE_FORMAT,
        "model": model_digest,
        "sampler": {k: v for k, v in sorted(dataclasses.asdict(sampler).items()) if k not in varying},
        "settings": [[s.guidance_scale, s.temperature] for s in settings],
        "sets": {split: {"prompts": hashlib.sha256("\n".join(s.prompts).encode()).hexdigest(), "seed": s.seed}
                 for split, s in sorted(sets.items())},
        "batch_size": EVAL_BATCH_SIZE,
        "torch": torch.__version__, "numpy": np.__version__,
        "device": torch.device(device).type, "threads": torch.get_num_threads(),
        "code": code_digest(),
    }


def cached_grid(model_spec: str, model: ImageModel, sets: dict[str, EvalSet], sampler: SamplerConfig,
                settings: Sequence[SamplerSetting], progress: bool = True, use_cache: bool = True) -> SamplerGrid:
    """`run_grid`, read from the result cache when this exact grid was computed before (module docstring)."""
    from margrpo.models.loading import model_files_digest

    key = grid_cache_key(model_files_digest(model_spec), sets, sampler, settings, model.device)
    if use_cache:
        payload = result_cache.read_entry(CACHE_KIND, key)
        if payload is not None:
            grid = SamplerGrid.from_json(payload)
            grid.cache_path, grid.from_cache = result_cache.entry_path(CACHE_KIND, key), True
            return grid
    grid = run_grid(model, sets, sampler, settings, progress=progress)
    grid.cache_path = result_cache.write_entry(CACHE_KIND, key, grid.to_json())
    return grid
