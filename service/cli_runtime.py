"""Subcommands (being written)."""


def add_commands(sub) -> None:
    del sub
