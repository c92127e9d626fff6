"""Per-client state that outlives a round: one safetensors file per client id.

Personalised factors (FedSA-LoRA's B), a client's own pruned rank (HetLoRA), and later
error-feedback residuals live here, not in a process's memory: in simulation a client may
run in any Ray worker, and on a real node each message starts a fresh ClientApp process.
Writes are atomic (a new file replaces the old, never written into), so a crash never
leaves a half-written file, and a checkpoint can keep a round's files as hard links.

A store opened with a ``run_tag`` (the server's tag of the run, which a resumed run
keeps) stamps every file with it and ignores files stamped by another run: a real node's
state folder outlives runs, and one run's personal factors or residuals must not leak
into the next.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from fedpeft.adapters import AdapterState

RUN_KEY = "__run__"


class ClientStateStore:
    """A folder of ``<client id>.safetensors`` files (optionally stamped with a run tag)."""

    def __init__(self, root: Path | str, run_tag: int | None = None) -> None:
        self.root = Path(root)
        self.run_tag = None if run_tag is None else torch.tensor(run_tag, dtype=torch.int64)

    def _path(self, client_id: str | int) -> Path:
        name = str(client_id)
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            raise ValueError(f"client id {name!r} is not a safe file name")
        return self.root / f"{name}.safetensors"

    def load(self, client_id: str | int) -> AdapterState:
        """The client's saved tensors, or ``{}`` for a client seen for the first time."""
        path = self._path(client_id)
        saved = load_file(str(path)) if path.is_file() else {}
        tag = saved.pop(RUN_KEY, None)
        if self.run_tag is not None and tag is not None and not torch.equal(tag, self.run_tag):
            return {}  # another run's state: this run starts the client afresh
        return saved

    def save(self, client_id: str | int, tensors: AdapterState) -> None:
        """Replace the client's saved tensors (atomically)."""
        self.root.mkdir(parents=True, exist_ok=True)
        path = self._path(client_id)
        tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
        tensors = {**tensors, RUN_KEY: self.run_tag} if self.run_tag is not None else tensors
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
