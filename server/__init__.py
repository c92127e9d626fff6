"""fedpeft's Flower ServerApp (``fedpeft.server.app:app``), round driver and simulation launcher."""
