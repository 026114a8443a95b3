"""What every command-line tool here shares: a user error is one line on stderr and exit status 2.

``ArgumentParser`` is ``argparse.ArgumentParser`` whose usage errors (a missing or unknown option, a bad
value) print ``PROG: error: MESSAGE (see PROG --help)`` on one line instead of the usage block plus the
message; sub-command parsers inherit it.
"""

from __future__ import annotations

import argparse
import sys

EXIT_USAGE = 2  # bad arguments, bad paths, bad configs: the user's to fix


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str):
        print(f"{self.prog}: error: {' '.join(message.split())} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(EXIT_USAGE)


def fail(message: str, prefix: str = "error: ") -> int:
    """Prints ``message`` as one line on stderr; returns the usage exit status."""
    print(prefix + " ".join(str(message).split()), file=sys.stderr, flush=True)
    return EXIT_USAGE
