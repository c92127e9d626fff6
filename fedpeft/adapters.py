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


def check_adapter_state(model: torch.nn.Module, state: AdapterState, partial: bool = False) -> None:
    """Raise AdapterMismatchError unless ``state`` fits the model.

    ``state`` must have the model's keys (all of them, or a subset when ``partial``) and
    the model's shapes.
    """
    expected = adapter_spec(model)
    missing = [] if partial else sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise AdapterMismatchError(
            f"adapter keys differ: {len(missing)} missing (e.g. {missing[:1]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:1]})"
        )
    for key, (shape, _) in expected.items():
        if key in state and tuple(state[key].shape) != shape:
            raise AdapterMismatchError(
                f"adapter tensor {key!r} has shape {tuple(state[key].shape)}, expected {shape}"
            )


def set_adapter_state(model: torch.nn.Module, state: AdapterState, partial: bool = False) -> None:
    """Load ``state`` into the model's active adapter, checking that nothing is off.

    With ``partial`` only the given tensors are replaced (e.g. B alone under FFA-LoRA).
    """
    check_adapter_state(model, state, partial)
    if partial:
        params = adapter_parameters(model)
        with torch.no_grad():
            for key, value in state.items():
                params[key].copy_(value)
        return
    result = set_peft_model_state_dict(model, state)
    unexpected = list(getattr(result, "unexpected_keys", []))
    if unexpected:
        raise AdapterMismatchError(f"peft did not use adapter keys {unexpected[:3]}")


def save_adapter(model: torch.nn.Module, directory: Path) -> None:
    """Write the adapter in Hugging Face peft format (``PeftModel.from_pretrained`` reads it)."""
    if not isinstance(model, PeftModel):
        raise TypeError(f"cannot save {type(model).__name__} as a peft adapter")
    model.save_pretrained(str(directory))


def adapter_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """Map each adapter-state key (as peft saves it) to the live parameter it names."""
    if not isinstance(model, PeftModel):
        return {}
    name = model.active_adapter
    params = {}
    for param_name, param in model.named_parameters():
        if f".{name}." not in param_name and not param_name.endswith(f".{name}"):
            continue
        key = param_name.replace(f".{name}", "").replace("modules_to_save.", "")
        params[key] = param
    keys = set(get_peft_model_state_dict(model))
    if set(params) != keys:
        raise AdapterMismatchError(
            f"cannot map adapter keys to parameters: {sorted(keys ^ set(params))[:3]}"
        )
    return params


def factor_of(key: str) -> str:
    """Which part of the adapter a state key holds: ``lora_A``, ``lora_B`` or ``head``."""
    for factor in ("lora_A", "lora_B"):
        if f".{factor}." in key:
            return factor
    return "head"


def lora_pairs(keys: list[str]) -> dict[str, tuple[str, str]]:
    """Group LoRA keys by adapted module: ``{module: (A key, B key)}``."""
    pairs: dict[str, dict[str, str]] = {}
    for key in keys:
        factor = factor_of(key)
        if factor != "head":
            module = key.split(f".{factor}.")[0]
            pairs.setdefault(module, {})[factor] = key
    return {m: (p["lora_A"], p["lora_B"]) for m, p in pairs.items() if len(p) == 2}


def set_trainable(model: torch.nn.Module, factors: set[str] | None = None) -> None:
    """Train exactly the adapter tensors of the given factors (all of them when None)."""
    for key, param in adapter_parameters(model).items():
        param.requires_grad_(factors is None or factor_of(key) in factors)


BaseDelta = dict[str, tuple[torch.Tensor, torch.Tensor]]  # module -> (P, Q), delta = P @ Q
_PRISTINE = "_fedpeft_pristine_weight"


def fold_base_delta(model: torch.nn.Module, delta: BaseDelta) -> None:
    """Set each adapted module's frozen base weight to ``W0 + P @ Q`` (peft's orientation).

    ``W0`` is the weight the module had before the first fold, kept on the module, so a
    fold replaces the previous one instead of adding to it; an empty ``delta`` restores
    ``W0`` everywhere it was changed. FLoRA merges and FedEx-LoRA residuals use this.
    """
    from strategies.lora_math import delta_weight

    layers = {m: model.get_submodule(m) for m in delta}
    for name, layer in model.named_modules():
        if hasattr(layer, _PRISTINE) and name not in layers:
            layers[name] = layer
    with torch.no_grad():
        for name, layer in layers.items():
            weight = layer.get_base_layer().weight  # type: ignore[operator]
            if not hasattr(layer, _PRISTINE):
                setattr(layer, _PRISTINE, weight.detach().clone())
            pristine = getattr(layer, _PRISTINE)
            if name in delta:
                p, q = delta[name]
                fan_in_fan_out = bool(getattr(layer, "fan_in_fan_out", False))
                d = delta_weight(p.to(weight.device), q.to(weight.device), 1.0, fan_in_fan_out)
                weight.copy_((pristine.double() + d.double()).to(weight.dtype))
            else:
                weight.copy_(pristine)


def base_delta_to_state(delta: BaseDelta) -> AdapterState:
    """Flatten a base delta into named tensors (``<module>.base_P`` / ``<module>.base_Q``)."""
    out = {}
    for module, (p, q) in delta.items():  # float32 on the wire, like the adapter itself
        out[f"{module}.base_P"], out[f"{module}.base_Q"] = p.float(), q.float()
    return out


def base_delta_from_state(state: AdapterState) -> BaseDelta:
    """Inverse of :func:`base_delta_to_state`."""
    return {
        key.removesuffix(".base_P"): (value, state[key.removesuffix("_P") + "_Q"])
        for key, value in state.items()
        if key.endswith(".base_P")
    }


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
