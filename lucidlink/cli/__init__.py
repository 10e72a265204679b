"""The ``lucid`` command line."""
