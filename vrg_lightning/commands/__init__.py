"""Sub-commands of the ``vrg`` command line (see :mod:`vrg_lightning.cli`)."""
