"""``python -m idempo``: the same as the ``idempo`` command."""

from idempo.cli import main

main()
