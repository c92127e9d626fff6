"""fedpeft's Flower ServerApp (``server.app:app``), round driver and simulation launcher."""
