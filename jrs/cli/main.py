"""The ``jrs`` command line: the application with every command group registered.

Every sub-command imports the units it needs lazily, so ``jrs --help`` stays fast and the
service/inference paths never pull in torch. One module per command group: `jrs.cli.data`,
`jrs.cli.recontour`, `jrs.cli.benchmark`, `jrs.cli.training`, `jrs.cli.serve`; shared options in
`jrs.cli.options`, the application and its error handling in `jrs.cli.app`.
"""

from jrs.cli import benchmark, data, recontour, serve, training
from jrs.cli.app import app

__all__ = ["app", "benchmark", "data", "main", "recontour", "serve", "training"]


def main() -> None:  # pragma: no cover - console entry
    """Console entry point."""
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
