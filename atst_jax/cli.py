"""What every command-line tool here shares: a user error is one line on stderr and exit status 2.

``run(main)`` is the guard every ``python -m atst_jax.*`` entry goes through last: a ``UserError`` (the one
error root, ``atst_jax.errors``) that escaped the command's own handling becomes that line, and Ctrl-C exits
130 without a traceback.

``ArgumentParser`` is ``argparse.ArgumentParser`` whose usage errors (a missing or unknown option, a bad
value) print ``PROG: error: MESSAGE (see PROG --help)`` on one line instead of the usage block plus the
message; sub-command parsers inherit it.

``check_output`` checks an output path before any work, so a command never computes for an hour and then
finds it cannot write.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from atst_jax.errors import UserError

EXIT_USAGE = 2  # bad arguments, bad paths, bad configs: the user's to fix


class OutputError(UserError):
    """An output path that cannot be written."""


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str):
        print(f"{self.prog}: error: {' '.join(message.split())} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(EXIT_USAGE)


def fail(message: str, prefix: str = "error: ") -> int:
    """Prints ``message`` as one line on stderr; returns the usage exit status."""
    print(prefix + " ".join(str(message).split()), file=sys.stderr, flush=True)
    return EXIT_USAGE


def run(main, argv=None) -> int:
    """``main(argv)``'s exit status, with a ``UserError`` as one line (exit 2) and Ctrl-C as exit 130."""
    try:
        return main(argv) if argv is not None else main()
    except UserError as e:
        return fail(e)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr, flush=True)
        return 130


def check_output(path, flag: str, *, directory: bool) -> None:
    """One line (``OutputError``) for an output that cannot be written, checked before any work: a directory
    output may not exist yet (it is created, parents too) but nothing on its way may be a file; a file
    output's folder must exist. The nearest existing folder must be writable."""
    path = Path(path)
    if directory and path.exists() and not path.is_dir():
        raise OutputError(f"{flag} {path} is a file, not a directory")
    if not directory and path.is_dir():
        raise OutputError(f"{flag} {path} is a directory, not a file")
    existing = path if directory else path.parent
    if not directory and not existing.is_dir():
        what = "is a file" if existing.exists() else "does not exist"
        raise OutputError(f"{flag} {path}: its folder {existing} {what}")
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise OutputError(f"{flag} {path}: {existing} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputError(f"{flag} {path}: {existing} is not writable")
