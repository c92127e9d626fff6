"""The commands people run, on top of every other layer: ``fedpeft`` and what it drives.

:mod:`.cli` is the ``fedpeft`` command; :mod:`.simulation` launches a run in Flower's
Simulation Engine (it hands Flower both the ServerApp and the ClientApp, so it lives here,
above both); :mod:`.compare`, :mod:`.deploy` and :mod:`.bench` are the ``compare``,
``deploy`` and ``bench`` sub-commands; :mod:`.interrupt` handles Ctrl-C for all of them.
Nothing below this package imports it.
"""
