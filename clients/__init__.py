"""fedpeft's Flower ClientApp (``clients.app:app``)."""
