"""``python -m jrs_cli`` runs the ``jrs`` command."""

from jrs_cli.main import main

main()
