"""The ``tprun`` command line."""
from __future__ import annotations

import click

from runtime import __version__


@click.group()
@click.version_option(__version__, prog_name="tprun")
def main() -> None:
    """Serve tpdeploy workspaces with tensor parallelism (one process per rank).

    Not built yet: `tprun generate` and `tprun serve` arrive with the runtime issue. Today, use
    `tpconv convert` to write a workspace and `tpconv inspect` to see how it is split.
    """
