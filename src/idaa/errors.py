"""Error types whose messages are shown to users as one line, without a traceback."""


class IdaaError(Exception):
    """A user-facing problem (bad flag, bad file, incompatible checkpoint); the CLI prints it and exits 2."""
