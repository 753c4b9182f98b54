"""Model loading: every way a config's `model:` (or `--model`) can name a model, to one `ImageModel`.

* `shipped:NAME`: a model that ships inside the package (`margrpo.assets`);
* a training run directory (one with `checkpoints/` and no exported `config.json`): its base model with the latest
  undamaged checkpoint's policy weights (a LoRA run's adapters merged in);
* a model folder (`config.json` + `model.safetensors`, written by `save_pretrained` or a converter);
* a NOVA folder (diffusers-style, `transformer/config.json`: upstream's `BAAI/nova-*` or a trained NOVA's export).
* a Harmon HF-format folder (`config.json` with `llm` and `mar` objects: `margrpo.compat.harmon.convert` or
  `HarmonImageModel.save_pretrained`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from margrpo.models.base import ImageModel
from margrpo.models.mar.image_model import FORMAT, MARImageModel
from margrpo.models.weights import preserves_global_rng


@preserves_global_rng
def load_model(spec: str, device: str | torch.device) -> ImageModel:
    """A model folder, `shipped:NAME` for a model that ships inside the package, or a training run.

    A run directory (one with ``checkpoints/``) gives its base model with the latest checkpoint's policy
    weights, so a run can be sampled and evaluated while it trains or after a crash, before it has
    exported ``model/``. Checkpoints hold only the trainable tensors, which is why the base is loaded first.
    """
    if spec.startswith("shipped:"):
        from margrpo.assets import shipped_model_path

        return load_folder(shipped_model_path(spec[len("shipped:"):]), device)
    path = Path(spec)
    if path.is_dir() and not (path / "config.json").is_file() and (path / "checkpoints").is_dir():
        return _load_run(path, device)
    return load_folder(path, device)


# the `format` a model folder's config.json names -> the ImageModel class that reads it
FOLDER_FORMATS: dict[str, type[ImageModel]] = {FORMAT: MARImageModel}


def load_folder(path: Path, device: str | torch.device) -> ImageModel:
    """A model folder: NOVA's diffusers-style layout (`transformer/config.json`, no top-level config.json), Harmon's
    HF format (config.json with `llm` and `mar`), or a margrpo folder by the `format` its config.json names; a
    folder that is none of them gets the margrpo folder loader, whose errors say what such a folder holds."""
    import json

    if path.is_dir() and not (path / "config.json").is_file():
        from margrpo.models.nova.image_model import is_nova_folder, load

        if is_nova_folder(path):
            return load(path, device=device)
        raise FileNotFoundError(
            f"{path}: not a model folder margrpo reads. Valid: a margrpo or Harmon folder (config.json + "
            "model.safetensors; `margrpo convert` writes them), a NOVA folder (transformer/config.json + "
            "scheduler/scheduler_config.json), or a training run directory (checkpoints/)")
    from margrpo.models.harmon.model import is_harmon_folder
    from margrpo.models.harmon.model import load_folder as load_harmon_folder

    if path.is_dir() and is_harmon_folder(path):
        return load_harmon_folder(path, device=device)
    try:
        fmt = json.loads((path / "config.json").read_text(encoding="utf-8")).get("format")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        fmt = None  # the margrpo loader reports the missing or unreadable file precisely
    return FOLDER_FORMATS.get(fmt, MARImageModel).load_pretrained(path, device=device)


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
    lora = state.get("lora")
    if lora:  # a LoRA run's checkpoint holds adapters: put them on the base model, load them, merge them
        from margrpo.models.lora import add_lora, merge_and_remove

        add_lora(model.policy, int(lora["rank"]), float(lora["alpha"]), lora["target_modules"],
                 torch.Generator(device=device))  # A is overwritten by the checkpoint's
    copy_policy_tensors(dict(model.named_parameters()), tensors["policy"], f"{ckpt} (base model {base!r})")
    if lora:
        merge_and_remove(model.policy)
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


def model_files_digest(spec: str) -> str:
    """SHA-256 of the files that define the model `spec` names (as `load_model` reads it): a model folder's files,
    or a run directory's latest complete checkpoint together with its base model's digest. What the result cache
    keys a model's evaluations by (`margrpo.utils.result_cache`): equal digests load the same model."""
    import hashlib
    import json

    from margrpo.utils.result_cache import files_digest

    if spec.startswith("shipped:"):
        from margrpo.assets import shipped_model_path

        return files_digest(shipped_model_path(spec[len("shipped:"):]))
    path = Path(spec)
    if path.is_dir() and not (path / "config.json").is_file() and (path / "checkpoints").is_dir():
        from margrpo.utils.checkpoint import latest_checkpoint

        ckpt = latest_checkpoint(path, verify=True)
        if ckpt is None:
            raise FileNotFoundError(f"{path}: a training run without a complete checkpoint to digest")
        base = json.loads((ckpt / "state.json").read_text(encoding="utf-8")).get("model")
        if not isinstance(base, str):
            raise ValueError(f"{ckpt}: state.json does not name the run's base model (key 'model')")
        return hashlib.sha256(f"{files_digest(ckpt)}:{model_files_digest(base)}".encode()).hexdigest()
    return files_digest(path)
