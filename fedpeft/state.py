"""Per-client state that outlives a round: one safetensors file per client id.

Personalised factors (FedSA-LoRA's B), a client's own pruned rank (HetLoRA), and later
error-feedback residuals live here, not in a process's memory: in simulation a client may
run in any Ray worker, and on a real node each message starts a fresh ClientApp process.
Writes are atomic, so a crash never leaves a half-written file.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from fedpeft.adapters import AdapterState


class ClientStateStore:
    """A folder of ``<client id>.safetensors`` files."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

    def _path(self, client_id: str | int) -> Path:
        name = str(client_id)
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            raise ValueError(f"client id {name!r} is not a safe file name")
        return self.root / f"{name}.safetensors"

    def load(self, client_id: str | int) -> AdapterState:
        """The client's saved tensors, or ``{}`` for a client seen for the first time."""
        path = self._path(client_id)
        return load_file(str(path)) if path.is_file() else {}

    def save(self, client_id: str | int, tensors: AdapterState) -> None:
        """Replace the client's saved tensors (atomically)."""
        self.root.mkdir(parents=True, exist_ok=True)
        path = self._path(client_id)
        tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))
        os.replace(tmp, path)

    def delete(self, client_id: str | int) -> None:
        """Forget the client's saved tensors (no error when there are none)."""
        self._path(client_id).unlink(missing_ok=True)

    def clients(self) -> list[str]:
        """Ids of every client with saved state."""
        return sorted(p.name.removesuffix(".safetensors") for p in self.root.glob("*.safetensors"))


def scalar(value: float) -> torch.Tensor:
    """A 0-d tensor, for storing a number next to tensors."""
    return torch.tensor(float(value))
