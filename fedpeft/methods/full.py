"""Full fine-tuning: every weight trains and travels (FedAvg of the whole model).

The baseline every comparison needs, done the way Flower's quickstart-pytorch does it;
there is nothing to apply, since the registry itself makes every parameter trainable.
"""

from __future__ import annotations

from fedpeft.methods.registry import register_method

register_method(
    "full",
    "full",
    "full fine-tuning: every weight trains and travels (the baseline)",
    kind="full",
    no_hybrid="it trains every weight already",
)
