"""What one message asks of a client: its ConfigRecord, parsed once into a typed object.

The server's strategy writes these entries (``fedpeft.strategies.adapter_strategy.instruct``
and Flower's own strategies); everything the ClientApp reads from the ConfigRecord is read
here, so a missing or malformed entry fails in one place with one line.
"""

from __future__ import annotations

from dataclasses import dataclass

from flwr.app import ConfigRecord

from fedpeft import records
from fedpeft.config import Scenario


@dataclass(frozen=True)
class Instructions:
    """A client's instructions for one message.

    The factor sets name ``lora_A``, ``lora_B`` and ``head``; an empty ``train_factors`` or
    ``send_factors`` means every adapter tensor, an empty ``personal_factors`` none.
    """

    scenario: Scenario
    server_round: int
    train_factors: frozenset[str]
    send_factors: frozenset[str]
    personal_factors: frozenset[str]
    #: every rank applies the scaling of the largest rank (HetLoRA), not peft's at its own
    shared_scaling: bool
    proximal_mu: float  # FedProx's mu (Flower's FedProx sets it); 0 = no proximal term
    prune_gamma: float  # HetLoRA's rank self-pruning regulariser weight; 0 = off
    prune_threshold: float  # HetLoRA: prune a tail whose norm is below this share; 0 = off

    @classmethod
    def parse(cls, config: ConfigRecord) -> Instructions:
        """Parse a message's ConfigRecord (``records.CONFIG``)."""
        if records.SCENARIO not in config:
            raise ValueError(f"the server's instructions hold no {records.SCENARIO!r}")

        def number(key: str) -> float:
            value = config.get(key, 0)
            try:
                return float(str(value))
            except ValueError:
                raise ValueError(f"instruction {key}={value!r} is not a number") from None

        mode = str(config.get(records.ALPHA_MODE, "per-rank"))
        if mode not in ("per-rank", "shared-scaling"):
            raise ValueError(f"instruction {records.ALPHA_MODE}={mode!r} is not known")
        return cls(
            scenario=Scenario.from_json(str(config[records.SCENARIO])),
            server_round=int(number(records.SERVER_ROUND)),
            train_factors=frozenset(records.factor_set(config, records.TRAIN_FACTORS)),
            send_factors=frozenset(records.factor_set(config, records.SEND_FACTORS)),
            personal_factors=frozenset(records.factor_set(config, records.PERSONAL_FACTORS)),
            shared_scaling=mode == "shared-scaling",
            proximal_mu=number(records.PROXIMAL_MU),
            prune_gamma=number(records.PRUNE_GAMMA),
            prune_threshold=number(records.PRUNE_THRESHOLD),
        )
