"""Training checkpoints: one way to save and load them for train, eval, sample and notebooks.

A checkpoint (``last.pt``, ``best.pt``) is a dict written atomically with ``torch.save``:
``model`` (state dict), ``model_class`` (e.g. ``"DiffuserForCausalLM"``), ``model_config``
(JSON of :class:`DiffuserConfig`), ``step``, and whatever training state the loop adds
(optimizer, scheduler, RNG states, run config). Loading never runs pickled code
(``weights_only=True``) and maps tensors to the CPU first, so a checkpoint written on a GPU loads
anywhere.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch

from .io import atomic_save
from .model import MODEL_CLASSES, DiffuserConfig, PretrainedModel


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, or not what the caller needs."""


def save_checkpoint(path: str | Path, model: PretrainedModel, step: int, **state: Any) -> None:
    """Write ``model`` (its class, config and weights), ``step`` and ``state`` to ``path``."""
    atomic_save(path, {"model": model.state_dict(), "model_class": type(model).__name__,
                       "model_config": model.config.model_dump_json(), "step": step, **state})


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint dict at ``path`` (tensors on the CPU); ``CheckpointError`` if unusable."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist"
                              + (" (it is a folder)" if path.is_dir() else ""))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, ValueError, OSError) as err:
        raise CheckpointError(f"checkpoint {path} is corrupt or not a checkpoint: {err}") from None
    if not isinstance(state, dict) or not {"model", "model_config", "step"} <= set(state):
        raise CheckpointError(f"checkpoint {path} lacks model weights, model_config or step")
    return state


def model_from_checkpoint(state: dict[str, Any], expected: type[PretrainedModel] | None = None,
                          device: torch.device | str | None = None,
                          engine: str | None = None) -> PretrainedModel:
    """Rebuild the saved model (its recorded class, config and weights) on ``device``.

    ``expected``: the class the caller needs (e.g. :class:`DiffuserForCausalLM` to sample); a
    checkpoint of another class is refused. Checkpoints written before the class was recorded
    are read as ``expected``. ``engine``: compute attention with this engine instead of the
    saved one (the same function; e.g. ``"gather"`` or ``"auto"`` on a GPU).
    """
    name = state.get("model_class") or (expected.__name__ if expected is not None else None)
    if name is None:
        raise CheckpointError("the checkpoint does not record its model class; pass expected=")
    if name not in MODEL_CLASSES:
        raise CheckpointError(f"the checkpoint holds a {name}, not one of {sorted(MODEL_CLASSES)}")
    if expected is not None and name != expected.__name__:
        raise CheckpointError(f"the checkpoint holds a {name}, not a {expected.__name__}")
    config = DiffuserConfig.model_validate_json(state["model_config"])
    if engine is not None:
        config = DiffuserConfig.model_validate({**config.model_dump(), "engine": engine})
    try:
        model = MODEL_CLASSES[name](config)
        model.load_state_dict(state["model"])
    except (ValueError, RuntimeError) as err:
        raise CheckpointError(f"the checkpoint's config and weights do not fit a {name}: "
                              f"{err}") from None
    return model.to(device) if device is not None else model
