"""Error types shared by every part of fmgs-avatar."""
from __future__ import annotations

import os


class FmgsInputError(ValueError):
    """Bad user input: a missing, corrupt or inconsistent file or setting.

    The message always names the offending file (when there is one) and what is
    wrong with it, so that the CLI can print it as-is without a traceback.

    Args:
        message: what is wrong.
        path: the file or folder concerned, or None.
    """

    def __init__(self, message: str, path: str | os.PathLike | None = None):
        self.path = None if path is None else os.fspath(path)
        full = message if self.path is None else f"{self.path}: {message}"
        super().__init__(full)


def run_cli(body, exit_codes: dict[type[BaseException], int] | None = None, prog: str | None = None) -> int:
    """Run a command-line body and turn its outcome into an exit status, the same way for
    every ``fmgs-*`` command: success 0 (or the int the body returns); :class:`FmgsInputError`
    prints ``[prog: ]error: <message naming the file or key>`` to stderr and gives 2 (no
    traceback); Ctrl-C gives 130.

    Args:
        body: a callable without arguments (the command's work); may return an exit status.
        exit_codes: further exception types that print ``error: ...`` and give the status
            mapped here (e.g. a failed export check: 1).
        prog: the command's name, put before ``error:``.

    Returns:
        The exit status.
    """
    import sys

    head = f"{prog}: error: " if prog else "error: "
    try:
        rc = body()
    except FmgsInputError as exc:
        print(f"{head}{exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except tuple(exit_codes or ()) as exc:
        print(f"{head}{exc}", file=sys.stderr)
        return exit_codes[next(t for t in exit_codes if isinstance(exc, t))]
    return rc if isinstance(rc, int) else 0
