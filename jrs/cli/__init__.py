"""The ``jrs`` command: sits above jrs, training, model_export and service; nothing imports it.

Each sub-command imports the units it needs lazily, so the layering of DESIGN.md holds: the core
package `jrs` never imports training or the service, and this command is the only place that
reaches all four.
"""

from jrs.cli.main import app, main

__all__ = ["app", "main"]
