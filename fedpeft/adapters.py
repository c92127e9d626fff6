"""The one place that extracts and loads adapter tensors.

Everything that travels between server and clients is the model's *adapter state*: the
tensors peft saves for the active adapter (LoRA factors, plus a task head trained from
scratch), exactly the parameters with ``requires_grad``. Nothing else in fedpeft reaches
into a raw ``state_dict()``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from peft import PeftModel, get_peft_model_state_dict, set_peft_model_state_dict

AdapterState = dict[str, torch.Tensor]


class AdapterMismatchError(ValueError):
    """An adapter state whose keys or shapes do not match the model."""


def get_adapter_state(model: torch.nn.Module) -> AdapterState:
    """Return detached CPU copies of the adapter tensors, keyed as peft saves them."""
    state = get_peft_model_state_dict(model) if isinstance(model, PeftModel) else {}
    return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}


def adapter_spec(model: torch.nn.Module) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Return ``{key: (shape, dtype)}`` of the adapter state the model expects."""
    return {k: (tuple(v.shape), v.dtype) for k, v in get_adapter_state(model).items()}


def check_adapter_state(model: torch.nn.Module, state: AdapterState) -> None:
    """Raise AdapterMismatchError unless ``state`` has exactly the model's keys and shapes."""
    expected = adapter_spec(model)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise AdapterMismatchError(
            f"adapter keys differ: {len(missing)} missing (e.g. {missing[:1]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:1]})"
        )
    for key, (shape, _) in expected.items():
        if tuple(state[key].shape) != shape:
            raise AdapterMismatchError(
                f"adapter tensor {key!r} has shape {tuple(state[key].shape)}, expected {shape}"
            )


def set_adapter_state(model: torch.nn.Module, state: AdapterState) -> None:
    """Load ``state`` into the model's active adapter, checking that nothing is off."""
    check_adapter_state(model, state)
    result = set_peft_model_state_dict(model, state)
    unexpected = list(getattr(result, "unexpected_keys", []))
    if unexpected:
        raise AdapterMismatchError(f"peft did not use adapter keys {unexpected[:3]}")


def save_adapter(model: torch.nn.Module, directory: Path) -> None:
    """Write the adapter in Hugging Face peft format (``PeftModel.from_pretrained`` reads it)."""
    if not isinstance(model, PeftModel):
        raise TypeError(f"cannot save {type(model).__name__} as a peft adapter")
    model.save_pretrained(str(directory))


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters local training updates (exactly those that travel)."""
    return [p for p in model.parameters() if p.requires_grad]


def count_trainable(model: torch.nn.Module) -> int:
    """Number of trainable (travelling) parameters."""
    return sum(p.numel() for p in trainable_parameters(model))


def base_model_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The full model's own parameters, as full fine-tuning would send them (no adapter)."""
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    return {
        name: p
        for name, p in base.named_parameters()
        if "lora_" not in name and ".modules_to_save." not in name
    }
