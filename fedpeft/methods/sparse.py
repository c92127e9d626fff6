"""A fixed sparse mask: train a chosen share of the entries of each target weight matrix.

Written by hand because Hugging Face peft has no fixed sparse mask with index/value
transport, and AdapterHub's ``adapters`` package pins transformers 4.x so it cannot be
used with transformers 5.

Each target matrix ``W0`` gets a frozen, sorted int64 buffer ``indices`` (flat positions,
``peft.sparse_fraction`` of its entries) and a trainable float32 vector ``values`` (zeros
at the start); the layer computes with ``W0 + delta``, ``delta`` holding ``values`` at
``indices``. Only ``values`` train and travel, so uplink bytes scale with the number of
masked entries, not with the matrix size. The indices never need to travel: every client
and the server derive the same mask, from (seed, module name) under ``random`` or from
the shared base weights under ``magnitude``. They are buffers of the model (in its
``state_dict``), and a reloaded adapter rebuilds them the same way.

The delta is a ``torch.nn.utils.parametrize`` parametrization of ``weight``: the base
model's own Parameter moves, frozen and not copied, to ``parametrizations.weight.original``.
"""

from __future__ import annotations

import zlib

import torch
from torch import nn
from torch.nn.utils import parametrize
from transformers.pytorch_utils import Conv1D

from fedpeft.config import PeftSection, ScenarioError
from fedpeft.methods.registry import MethodContext, register_method

MATRICES = (nn.Linear, Conv1D)


class SparseDelta(nn.Module):
    """Parametrization ``W -> W + delta``, with ``delta`` = ``values`` at flat ``indices``."""

    def __init__(self, indices: torch.Tensor) -> None:
        super().__init__()
        self.indices: torch.Tensor
        self.register_buffer("indices", indices.to(torch.int64))
        self.values = nn.Parameter(torch.zeros(indices.numel(), device=indices.device))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        """Return the effective weight; the gradient reaches ``values`` only."""
        flat = weight.reshape(-1)
        # index_put (not index_add) stays deterministic on CUDA; the indices are unique
        picked = (flat[self.indices].to(self.values.dtype) + self.values).to(weight.dtype)
        return flat.index_put((self.indices,), picked).view_as(weight)

    def extra_repr(self) -> str:
        """Show the number of masked entries when the model is printed."""
        return f"nnz={self.indices.numel()}"


def mask_seed(seed: int, name: str) -> int:
    """A generator seed for module ``name``, the same in every process (unlike ``hash()``).

    32 bits, because torch's CPU generator (mt19937) ignores the higher bits of a seed.
    """
    return zlib.crc32(f"{seed}:{name}".encode())


def random_mask(numel: int, nnz: int, seed: int, name: str) -> torch.Tensor:
    """``nnz`` distinct flat indices in ``[0, numel)`` drawn from (seed, name), sorted."""
    generator = torch.Generator().manual_seed(mask_seed(seed, name))
    return torch.randperm(numel, generator=generator)[:nnz].sort().values


def magnitude_mask(weight: torch.Tensor, nnz: int) -> torch.Tensor:
    """The flat indices of the ``nnz`` largest ``|weight|``, sorted; ties go to the lower index."""
    scores = weight.detach().abs().reshape(-1).float().cpu()
    order = torch.sort(scores, descending=True, stable=True).indices
    return order[:nnz].sort().values


def nnz_of(numel: int, fraction: float) -> int:
    """Number of masked entries of a matrix of ``numel`` entries (at least one)."""
    return min(numel, max(1, round(fraction * numel)))


def _base_of(module: nn.Module) -> nn.Module:
    """The layer holding the weight under peft's (or fedpeft's) wrappers."""
    while isinstance(getattr(module, "base_layer", None), nn.Module):
        module = module.base_layer  # type: ignore[assignment]
    return module


def sparse_targets(
    model: nn.Module, cfg: PeftSection, ctx: MethodContext
) -> list[tuple[str, nn.Module]]:
    """The (name, layer) pairs whose weight gets a mask, in model order.

    ``peft.target_modules`` names them by suffix, as in peft; when empty, every frozen
    linear (or transformers ``Conv1D``) layer outside the task head and the output
    embeddings. Weights another method already trains (its own layers) are left out.
    """
    heads = set(ctx.head_modules)
    get_out = getattr(model, "get_output_embeddings", None)
    out_emb = get_out() if callable(get_out) else None
    found: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if heads & set(name.split(".")):
            continue
        if cfg.target_modules:
            if not any(name == t or name.endswith(f".{t}") for t in cfg.target_modules):
                continue
            layer = _base_of(module)
            if not isinstance(layer, MATRICES):
                raise ScenarioError(
                    f"peft.target_modules matches {name!r} ({type(layer).__name__}), which "
                    "is not a linear layer: name linear layers for peft.method 'sparse'"
                )
        else:
            layer = module
            if layer is out_emb or not isinstance(layer, MATRICES):
                continue
        weight = layer.weight
        if not weight.requires_grad and not parametrize.is_parametrized(layer, "weight"):
            found.append((name, layer))
    return found


def apply_sparse(model: nn.Module, cfg: PeftSection, ctx: MethodContext) -> None:
    """Put a fixed sparse delta on every target weight; only its ``values`` train."""
    targets = sparse_targets(model, cfg, ctx)
    if not targets:
        which = cfg.target_modules or "(every linear layer)"
        raise ScenarioError(
            f"peft.target_modules={which} matches no frozen linear layer of "
            f"{type(model).__name__} for peft.method 'sparse'"
        )
    for name, layer in targets:
        weight: torch.Tensor = layer.weight  # type: ignore[assignment]
        nnz = nnz_of(weight.numel(), cfg.sparse_fraction)
        if cfg.sparse_selection == "random":
            indices = random_mask(weight.numel(), nnz, ctx.seed, name)
        else:
            indices = magnitude_mask(weight, nnz)
        parametrize.register_parametrization(
            layer, "weight", SparseDelta(indices.to(weight.device))
        )


def sparse_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """Each masked layer's flat indices, keyed by layer name (to save or compare masks)."""
    return {
        name: module.parametrizations.weight[0].indices
        for name, module in model.named_modules()
        if parametrize.is_parametrized(module, "weight")
        and isinstance(module.parametrizations.weight[0], SparseDelta)
    }


register_method(
    "sparse",
    "selective",
    "trains a fixed sparse share of each weight matrix (mask from the seed or |W0|)",
    kind="fedpeft",
    apply=apply_sparse,
)
