"""Sub-commands of the ``sensitune`` CLI, one module each (see ``sensitune.cli``)."""
