"""A no-op target in a module of its own, so a child that imports it imports nothing else."""


def noop() -> None:
    """Do nothing."""
