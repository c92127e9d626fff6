"""fedpeft: federated parameter-efficient fine-tuning on Flower (the core library)."""

__version__ = "0.1.0"
