"""Error types whose messages are shown to users as one line, without a traceback."""

import sys


class IdaaError(Exception):
    """A user-facing problem (bad flag, bad file, incompatible checkpoint); the CLI prints it and exits 2."""

    exit_code = 2


class WriteFault(IdaaError):
    """The filesystem refused a write (disk full, quota, read-only, I/O error): worth retrying once it is fixed.

    Exit code 75 is EX_TEMPFAIL (sysexits.h): schedulers and scripts read it as "try again later".
    """

    exit_code = 75


class DataError(IdaaError, ValueError):
    """Bad or missing data; the message is one line that names the file or folder at fault."""

    def __init__(self, message: str) -> None:
        super().__init__(one_line(message))


def one_line(text: object) -> str:
    """Collapse any message to a single line so errors stay readable in logs and CLIs."""
    return " ".join(str(text).split())


def exception_text(exc: BaseException) -> str:
    """An exception in one line, its type's name when it has no message (for 'cannot read X: <why>' errors)."""
    return one_line(exc) or type(exc).__name__


def warn(message: str) -> None:
    """A one-line warning on stderr (e.g. bad images skipped), the same prefix as the CLI's errors."""
    print(f"idaa: warning: {one_line(message)}", file=sys.stderr, flush=True)
