"""Injected failures (a scenario's ``[faults]``): lost, crashing, slow, NaN-sending, lying clients.

Whether a client fails in a round is a pure function of (seed, round, client, kind), so a
run's failures are the same every time and the same in simulation and deployment. The
server drops lost instructions (:class:`fedpeft.server.reliability.FaultyGrid`); the rest happens
in the client, in :func:`fedpeft.clients.faults.fault_mod`, around the real training handler.
"""

from __future__ import annotations

import hashlib

from fedpeft.config import FaultsSection, Scenario


def strikes(seed: int, server_round: int, partition_id: int, kind: str, rate: float) -> bool:
    """Whether fault ``kind`` hits this client in this round (probability ``rate``)."""
    if rate <= 0:
        return False
    digest = hashlib.sha256(f"{seed}/{server_round}/{partition_id}/{kind}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < rate


def faults_of(scenario: Scenario, server_round: int, partition_id: int) -> set[str]:
    """The faults that hit client ``partition_id`` in ``server_round``."""
    f: FaultsSection = scenario.faults
    rates = {"drop": f.drop_rate, "crash": f.crash_rate, "slow": f.slow_rate, "nan": f.nan_rate}
    return {k for k, r in rates.items() if strikes(scenario.seed, server_round, partition_id, k, r)}
