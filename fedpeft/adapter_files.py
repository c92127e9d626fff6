"""Saving a trained adapter to a folder, and rebuilding the model from that folder.

A single peft method is saved in Hugging Face peft format, full fine-tuning as a plain
transformers model, anything else in fedpeft's own safetensors file; every format also
gets ``fedpeft_adapter.json``, which says how to rebuild the base model and its methods.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel, set_peft_model_state_dict
from peft.utils import load_peft_weights
from safetensors.torch import load_file, save_file

from fedpeft.adapters import (
    META_ATTR,
    AdapterMismatchError,
    adapter_spec,
    get_adapter_state,
    set_adapter_state,
)
from fedpeft.config import ModelSection, PeftSection
from fedpeft.methods import build_peft_model, get_method
from fedpeft.models import load_base_model

META_FILE = "fedpeft_adapter.json"  # how fedpeft rebuilds the model (written for every method)
STATE_FILE = "fedpeft_adapter.safetensors"  # the adapter tensors, for methods peft cannot save


def save_adapter(model: torch.nn.Module, directory: Path) -> None:
    """Write the trained adapter so it reloads without this run.

    A single peft method is saved in Hugging Face peft format
    (``PeftModel.from_pretrained(base, directory)`` reads it, with no fedpeft import);
    full fine-tuning is saved as a plain transformers model (``from_pretrained``). Methods
    peft lacks, and hybrids, are saved as ``fedpeft_adapter.safetensors``, which
    :func:`load_adapter` reads. Every format also gets ``fedpeft_adapter.json``: the
    model, task, method settings and seed that rebuild the same model.
    """
    directory = Path(directory)
    meta: dict[str, Any] = dict(getattr(model, META_ATTR, {}))
    if not {"model", "num_labels", "peft"} <= set(meta):
        raise ValueError(
            "cannot save an adapter without knowing its base model: build the model with "
            "fedpeft.models.cached_peft_model (or record model and num_labels in its meta)"
        )
    directory.mkdir(parents=True, exist_ok=True)
    methods = [get_method(m) for m in PeftSection(**meta["peft"]).methods]
    if isinstance(model, PeftModel) and len(methods) <= 1:
        model.save_pretrained(str(directory))
        meta["format"] = "peft"
    elif len(methods) == 1 and methods[0].kind == "full":
        model.save_pretrained(str(directory))  # type: ignore[operator]
        meta["format"] = "transformers"
    else:
        save_file(
            {k: v.contiguous() for k, v in get_adapter_state(model).items()},
            str(directory / STATE_FILE),
        )
        meta["format"] = "fedpeft"
    (directory / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))


def load_adapter(directory: Path | str, base: torch.nn.Module | None = None) -> torch.nn.Module:
    """Rebuild a model saved by :func:`save_adapter`: base model plus trained adapter.

    ``base`` defaults to the base model named in ``fedpeft_adapter.json`` (it must load
    from there: a bundled alias, a local folder or a reachable hub id).
    """
    directory = Path(directory)
    meta = json.loads((directory / META_FILE).read_text())
    peft_cfg = PeftSection(**meta["peft"])
    model_cfg = ModelSection(**meta["model"])
    if meta["format"] == "transformers":
        model_cfg = ModelSection(**{**meta["model"], "name": str(directory)})
        return load_base_model(model_cfg, meta["num_labels"])
    if base is None:
        base = load_base_model(model_cfg, meta["num_labels"])
    if meta["format"] == "peft" and any(get_method(m).prompt for m in peft_cfg.methods):
        # peft saves the prompts a prompt encoder made, not the encoder: peft reloads them
        for name in peft_cfg.methods:
            if (prepare := get_method(name).prepare) is not None:
                prepare(base)
        return PeftModel.from_pretrained(base, str(directory))
    model = build_peft_model(base, peft_cfg, meta["task"], meta["seed"])
    if meta["format"] == "peft":  # peft's own file, read by peft
        weights = load_peft_weights(str(directory))
        result = set_peft_model_state_dict(model, weights)
        unexpected = list(getattr(result, "unexpected_keys", []))
        if unexpected or len(weights) != len(adapter_spec(model)):  # none unknown, none left out
            raise AdapterMismatchError(
                f"{directory} holds {len(weights)} adapter tensors for a model that trains "
                f"{len(adapter_spec(model))} (unexpected: {unexpected[:3]})"
            )
    else:
        set_adapter_state(model, load_file(str(directory / STATE_FILE)))
    model.eval()
    return model
