"""fedpeft's Flower ClientApp (``fedpeft.clients.app:app``)."""
