"""Bad input on the command line: one line on stderr, exit status 2, never a traceback.

Every command (``cds-service …``, ``python -m cds_service.tools.…``) parses its arguments with
:class:`CommandParser` and raises :class:`InputError` for input it cannot use; the entry point prints
the message as ``<command>: <message>`` and exits with 2.
"""

from __future__ import annotations

import argparse
from typing import NoReturn

#: Exit status for bad input (the one argparse uses for usage errors).
EXIT_BAD_INPUT = 2


class InputError(ValueError):
    """Bad input to a command: a missing or malformed file, a wrong shape, an unknown name."""


class CommandParser(argparse.ArgumentParser):
    """argparse, with a usage error as one line on stderr instead of the usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: {message} (see {self.prog} --help)\n")


def tcp_port(text: str) -> int:
    """argparse type: a TCP port number."""
    try:
        port = int(text)
    except ValueError:
        port = 0
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"not a TCP port (1–65535): {text!r}")
    return port
