"""The one place that extracts and loads adapter tensors, and saves and reloads adapters.

Everything that travels between server and clients is the model's *adapter state*:
exactly the parameters that train, as :func:`fedpeft.methods.build_peft_model` recorded
them (peft's adapter tensors, fedpeft's own BitFit biases, sparse values or bottleneck
adapters, a task head trained from scratch, or every weight under full fine-tuning).
Nothing else in fedpeft reaches into a raw ``state_dict()``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel, set_peft_model_state_dict
from peft.utils import load_peft_weights
from safetensors.torch import load_file, save_file

from fedpeft.lora import delta_weight

AdapterState = dict[str, torch.Tensor]


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
    from fedpeft.methods import TRAVEL_ATTR

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
                from fedpeft.config import ScenarioError

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
    from fedpeft.methods import BASE_ATTR

    ids = getattr(model, BASE_ATTR, None)
    if ids is None:
        base = model.get_base_model() if isinstance(model, PeftModel) else model
        return dict(base.named_parameters())
    return {name: p for name, p in model.named_parameters() if id(p) in ids}


# ------------------------------------------------------------------------ saving, loading

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
    from fedpeft.methods import META_ATTR, get_method

    directory = Path(directory)
    meta: dict[str, Any] = dict(getattr(model, META_ATTR, {}))
    if not {"model", "num_labels", "peft"} <= set(meta):
        raise ValueError(
            "cannot save an adapter without knowing its base model: build the model with "
            "fedpeft.models.cached_peft_model (or record model and num_labels in its meta)"
        )
    directory.mkdir(parents=True, exist_ok=True)
    from fedpeft.config import PeftSection

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
    from fedpeft.config import ModelConfig, PeftSection
    from fedpeft.methods import build_peft_model, get_method
    from fedpeft.models import load_base_model

    directory = Path(directory)
    meta = json.loads((directory / META_FILE).read_text())
    peft_cfg = PeftSection(**meta["peft"])
    model_cfg = ModelConfig(**meta["model"])
    if meta["format"] == "transformers":
        model_cfg = ModelConfig(**{**meta["model"], "name": str(directory)})
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
