"""The one-command fleet demo (``bash demo/run``): see :mod:`demo.fleet`."""
