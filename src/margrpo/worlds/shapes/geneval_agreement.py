"""How often GenEval's rules, driven by the shapes detector, agree with the shapes verifier (strict), per category.

    python -m margrpo.worlds.shapes.geneval_agreement --out docs/findings/data/2026-12-07-geneval-on-shapes.json

Two image sets, each scored by the verifier (``strict``) and, from the same detections, by the ``geneval`` reward
with the ``shapes`` detector (GenEval's ``correct`` and Flow-GRPO's ``exact``; ``geneval_bridge`` maps prompts to
metadata):

- ``rendered``: per category, prompts drawn from the whole grammar; each scene is rendered for its own prompt and
  scored against it (should pass) and against another prompt of the category (should mostly fail);
- ``base``: samples of a model (default the shipped base) on the held-out and the training prompts, one image each.

Every disagreement is put in a class (:func:`disagreement_class`); the finding explains each.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .geneval_bridge import geneval_metadata
from .prompts import all_prompts, parse_prompt
from .render import render_scene, tensor_to_images
from .spec import CATEGORIES, PromptSpec
from .verifier import score

__all__ = ["agreement_table", "disagreement_class", "score_both"]


def score_both(images: Sequence[Image.Image], prompts: Sequence[str]) -> list[dict[str, Any]]:
    """Per image: the verifier's result and the GenEval readings (``correct``, ``exact``, ``partial``)."""
    from margrpo.rewards.geneval import GenevalReward

    specs = [parse_prompt(p) for p in prompts]
    meta = [geneval_metadata(s, p) for s, p in zip(specs, prompts, strict=True)]
    out = GenevalReward(detector="shapes", mode="correct", catch_errors=False, batch_size=64)(list(images),
                                                                                             list(prompts), meta)
    ver = score(list(images), list(prompts))
    rows = []
    for i, (v, spec) in enumerate(zip(ver, specs, strict=True)):
        rows.append({"prompt": prompts[i], "category": spec.category, "strict": bool(v["strict"]),
                     "correct": bool(out.components["correct"][i]), "exact": bool(out.components["exact"][i]),
                     "partial": float(out.components["partial"][i]), "checks": v["checks"], "objects": v["objects"]})
    return rows


def disagreement_class(row: dict[str, Any], reading: str) -> str | None:
    """Why GenEval's ``reading`` (``correct`` or ``exact``) and the verifier differ on a row; None if they agree."""
    if row[reading] == row["strict"]:
        return None
    spec: PromptSpec = parse_prompt(row["prompt"])
    checks = row["checks"]
    counts = {i: sum(1 for d in row["objects"] if d["colour"] == o.colour and d["shape"] == o.shape)
              for i, o in enumerate(spec.objects)}
    if row[reading]:  # GenEval passes, the verifier fails
        if any(counts[i] > o.count for i, o in enumerate(spec.objects)):
            return "GenEval passes: more objects of a named kind than asked (GenEval needs at least the count)"
        if any(k.startswith("purity") and v < 1 for k, v in checks.items()):
            return ("GenEval passes: a named shape also in another colour, less confident than the asked one "
                    "(GenEval reads the colour of the top objects only)")
        return "GenEval passes: other"
    shapes = [o.shape for o in spec.objects]
    if len(set(shapes)) < len(shapes):
        return "verifier passes: the two named objects share a shape (one GenEval class, top object read twice)"
    return "verifier passes: other"


def agreement_table(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per category and overall: n, pass rates, agreement of each reading with strict, disagreement classes."""
    out: dict[str, Any] = {}
    for cat in [*CATEGORIES, "all"]:
        rs = [r for r in rows if cat == "all" or r["category"] == cat]
        if not rs:
            continue
        entry: dict[str, Any] = {"n": len(rs), "strict": float(np.mean([r["strict"] for r in rs]))}
        for reading in ("correct", "exact"):
            entry[reading] = float(np.mean([r[reading] for r in rs]))
            entry[f"agree_{reading}"] = float(np.mean([r[reading] == r["strict"] for r in rs]))
            entry[f"classes_{reading}"] = dict(Counter(c for r in rs if (c := disagreement_class(r, reading))))
        out[cat] = entry
    return out


def rendered_rows(per_category: int, seed: int) -> list[dict[str, Any]]:
    rng = np.random.default_rng(seed)
    images, prompts = [], []
    for cat in CATEGORIES:
        pool = all_prompts(cat)
        chosen = [pool[i] for i in rng.choice(len(pool), size=per_category, replace=len(pool) < per_category)]
        for p in chosen:
            im = render_scene(p, rng)
            other = p
            while other == p:
                other = pool[int(rng.integers(len(pool)))]
            images += [im, im]
            prompts += [p, other]
    return score_both(images, prompts)


def base_rows(model_spec: str, per_category: int, seed: int) -> list[dict[str, Any]]:
    import torch

    from margrpo.models.loading import load_model
    from margrpo.sampling.config import SamplerConfig

    from .evaluate import eval_prompt_set, evaluate, train_prompt_set

    model = load_model(model_spec, torch.device("cpu"))
    prompts = eval_prompt_set(per_category) + train_prompt_set(per_category)
    cfg = SamplerConfig(ar_steps=16, diffusion_steps=None, guidance_scale=3.0)  # `margrpo eval`'s defaults
    res = evaluate(model, prompts, cfg, seed=seed)
    assert res.images is not None
    return score_both(tensor_to_images(res.images), prompts)


def _markdown(tables: dict[str, dict[str, Any]]) -> str:
    lines = ["| set | category | n | verifier strict | GenEval correct | agree | Flow-GRPO exact | agree |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for name, table in tables.items():
        for cat, e in table.items():
            lines.append(f"| {name} | {cat} | {e['n']} | {e['strict']:.3f} | {e['correct']:.3f} | "
                         f"{e['agree_correct']:.3f} | {e['exact']:.3f} | {e['agree_exact']:.3f} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=None, help="write the tables and every row here (JSON)")
    ap.add_argument("--rendered-per-category", type=int, default=100)
    ap.add_argument("--base-per-category", type=int, default=100,
                    help="base-model images per category, on held-out and on training prompts each")
    ap.add_argument("--model", default="shipped:shapes-base")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    sets = {"rendered": rendered_rows(args.rendered_per_category, args.seed)}
    if args.base_per_category > 0:
        sets["base"] = base_rows(args.model, args.base_per_category, args.seed)
    tables = {k: agreement_table(v) for k, v in sets.items()}
    print(_markdown(tables))
    for name, table in tables.items():
        for reading in ("correct", "exact"):
            print(f"{name}, {reading}: {table['all'][f'classes_{reading}']}")
    if args.out is not None:
        keep = ("prompt", "category", "strict", "correct", "exact", "partial")
        rows = {name: [{**{k: r[k] for k in keep}, **{f"class_{rd}": c for rd in ("correct", "exact")
                                                      if (c := disagreement_class(r, rd))}} for r in rs]
                for name, rs in sets.items()}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "tables": tables,
                                        "rows": rows}, indent=0))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
