"""The one exception the CLI turns into a one-line error message."""


class HybridatError(Exception):
    """Bad input: a missing or corrupt file, an unknown name, an impossible value."""
