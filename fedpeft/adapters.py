"""The one place that extracts and loads adapter tensors.

Everything that travels between server and clients is the model's *adapter state*:
exactly the parameters that train, as :func:`fedpeft.methods.build_peft_model` recorded
them (peft's adapter tensors, fedpeft's own BitFit biases, sparse values or bottleneck
adapters, a task head trained from scratch, or every weight under full fine-tuning).
Nothing else in fedpeft reaches into a raw ``state_dict()``. Saving a trained adapter to
a folder, and rebuilding the model from it, is :mod:`fedpeft.adapter_files`.
"""

from __future__ import annotations

import torch
from peft import PeftModel

from fedpeft.config import ScenarioError
from fedpeft.lora import fold_into_weight

AdapterState = dict[str, torch.Tensor]

# attribute names fedpeft.methods.build_peft_model sets on a model it built, read here
TRAVEL_ATTR = "_fedpeft_travel"  # parameter names that train and travel, in model order
BASE_ATTR = "_fedpeft_base_params"  # ids of the base model's own parameters
META_ATTR = "_fedpeft_meta"  # what a loader needs to rebuild the model (see adapter_files)


class AdapterMismatchError(ValueError):
    """An adapter state whose keys or shapes do not match the model."""


def _canonical(name: str) -> str:
    """A parameter's key on the wire: its name without peft's adapter-name segments.

    ``...query.lora_A.default.weight`` -> ``...query.lora_A.weight`` and
    ``...classifier.modules_to_save.default.weight`` -> ``...classifier.weight``: the keys
    peft itself saves for LoRA-style methods.
    """
    return ".".join(p for p in name.split(".") if p not in ("default", "modules_to_save"))


def adapter_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """Map each adapter-state key to the live parameter it names.

    The adapter is what :func:`fedpeft.methods.build_peft_model` recorded as trainable:
    peft's adapter tensors, fedpeft's own (BitFit biases, sparse values, bottleneck
    adapters), the task head, or every weight under full fine-tuning.
    """
    names = getattr(model, TRAVEL_ATTR, None)
    if names is None:  # a model fedpeft did not build: peft's adapter, if any
        if not isinstance(model, PeftModel):
            return {}
        tag = model.active_adapter
        names = [n for n, _ in model.named_parameters() if tag in n.split(".")]
    named = dict(model.named_parameters())
    params = {_canonical(n): named[n] for n in names}
    if len(params) != len(names):
        raise AdapterMismatchError("two adapter parameters map to the same key")
    return params


def get_adapter_state(model: torch.nn.Module) -> AdapterState:
    """Return detached CPU copies of the adapter tensors, keyed as peft saves them."""
    return {k: v.detach().to("cpu", copy=True) for k, v in adapter_parameters(model).items()}


def adapter_spec(model: torch.nn.Module) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Return ``{key: (shape, dtype)}`` of the adapter state the model expects."""
    return {k: (tuple(v.shape), v.dtype) for k, v in adapter_parameters(model).items()}


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
    """Copy ``state`` into the model's adapter, checking that nothing is off.

    With ``partial`` only the given tensors are replaced (e.g. B alone under FFA-LoRA).
    """
    check_adapter_state(model, state, partial)
    params = adapter_parameters(model)
    with torch.no_grad():
        for key, value in state.items():
            params[key].copy_(value)


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
    layers = {m: model.get_submodule(m) for m in delta}
    for name, layer in model.named_modules():
        if hasattr(layer, _PRISTINE) and name not in layers:
            layers[name] = layer
    with torch.no_grad():
        for name, layer in layers.items():
            weight = layer.get_base_layer().weight  # type: ignore[operator]
            if not weight.is_floating_point():  # 8-bit codes would silently take the sum
                raise ScenarioError(
                    f"this strategy changes the frozen base weights (FLoRA, FedEx-LoRA), which "
                    f"model.quantization made {weight.dtype} in {name}: set "
                    "model.quantization='none' or use another strategy"
                )
            if not hasattr(layer, _PRISTINE):
                setattr(layer, _PRISTINE, weight.detach().clone())
            pristine = getattr(layer, _PRISTINE)
            if name in delta:
                p, q = delta[name]
                fan_in_fan_out = bool(getattr(layer, "fan_in_fan_out", False))
                p, q = p.to(weight.device), q.to(weight.device)
                weight.copy_(fold_into_weight(pristine, p, q, 1.0, fan_in_fan_out))
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
    ids = getattr(model, BASE_ATTR, None)
    if ids is None:
        base = model.get_base_model() if isinstance(model, PeftModel) else model
        return dict(base.named_parameters())
    return {name: p for name, p in model.named_parameters() if id(p) in ids}
