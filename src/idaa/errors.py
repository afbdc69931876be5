"""Error types whose messages are shown to users as one line, without a traceback."""


class IdaaError(Exception):
    """A user-facing problem (bad flag, bad file, incompatible checkpoint); the CLI prints it and exits 2."""

    exit_code = 2


class WriteFault(IdaaError):
    """The filesystem refused a write (disk full, quota, read-only, I/O error): worth retrying once it is fixed.

    Exit code 75 is EX_TEMPFAIL (sysexits.h): schedulers and scripts read it as "try again later".
    """

    exit_code = 75
