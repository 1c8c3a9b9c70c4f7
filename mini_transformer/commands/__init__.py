"""Subcommands of the ``mini-transformer`` CLI, one module each (see ``cli.COMMANDS``)."""
