"""Model loading: every way a config's `model:` (or `--model`) can name a model, to one `ImageModel`.

* `shipped:NAME`: a model that ships inside the package (`margrpo.assets`);
* a training run directory (one with `checkpoints/` and no exported `config.json`): its base model with the latest
  undamaged checkpoint's policy weights;
* a model folder (`config.json` + `model.safetensors`, written by `save_pretrained` or a converter);
* a Harmon HF-format folder (`config.json` with `llm` and `mar` objects: `margrpo.compat.harmon.convert` or
  `HarmonImageModel.save_pretrained`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from margrpo.models.base import ImageModel
from margrpo.models.mar.image_model import MARImageModel


def load_model(spec: str, device: str | torch.device) -> ImageModel:
    """A model folder, `shipped:NAME` for a model that ships inside the package, or a training run.

    A run directory (one with ``checkpoints/``) gives its base model with the latest checkpoint's policy
    weights, so a run can be sampled and evaluated while it trains or after a crash, before it has
    exported ``model/``. Checkpoints hold only the trainable tensors (DESIGN section 5), which is why the
    base is loaded first.
    """
    if spec.startswith("shipped:"):
        from margrpo.assets import shipped_model_path

        return MARImageModel.load_pretrained(shipped_model_path(spec[len("shipped:"):]), device=device)
    path = Path(spec)
    if path.is_dir() and not (path / "config.json").is_file() and (path / "checkpoints").is_dir():
        return _load_run(path, device)
    from margrpo.models.harmon.loading import is_harmon_folder, load_folder

    if path.is_dir() and is_harmon_folder(path):
        return load_folder(path, device=device)
    return MARImageModel.load_pretrained(spec, device=device)


def _load_run(run_dir: Path, device: str | torch.device) -> ImageModel:
    from margrpo.utils.checkpoint import latest_checkpoint, load_checkpoint

    ckpt = latest_checkpoint(run_dir, verify=True)
    if ckpt is None:
        raise FileNotFoundError(f"{run_dir}: a training run without a complete checkpoint under "
                                f"{run_dir / 'checkpoints'} (damaged ones do not count) and no exported model "
                                "(config.json)")
    tensors, state = load_checkpoint(ckpt, groups=["policy"], device=device, verify=False)  # verified above
    base = state.get("model")
    if not isinstance(base, str):
        raise ValueError(f"{ckpt}: state.json does not name the run's base model (key 'model')")
    model = load_model(base, device)
    copy_policy_tensors(dict(model.named_parameters()), tensors["policy"], f"{ckpt} (base model {base!r})")
    return model


def copy_policy_tensors(params: dict[str, torch.nn.Parameter], policy: dict[str, torch.Tensor], source: str) -> None:
    """Copy a checkpoint's policy tensors into same-named parameters, naming `source` on any mismatch."""
    unknown = sorted(set(policy) - set(params))
    if unknown:
        raise ValueError(f"{source}: policy tensors {unknown[:5]} do not exist in the model")
    with torch.no_grad():
        for name, t in policy.items():
            if t.shape != params[name].shape:
                raise ValueError(f"{source}: policy tensor {name} has shape {tuple(t.shape)}, the model's "
                                 f"parameter has {tuple(params[name].shape)}")
            params[name].copy_(t)
