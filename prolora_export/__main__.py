"""``python -m prolora_export`` is the ``prolora-export`` command."""

from .cli import main

main()
