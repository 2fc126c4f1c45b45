"""``python -m jrs.cli`` runs the ``jrs`` command."""

from jrs.cli.main import main

main()
