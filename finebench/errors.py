"""The one exception type for errors a user can cause.

The CLI turns a ``FinebenchError`` into a single line on stderr and a non-zero exit code, so
every message must stand alone: name the file, field or value and say what was expected.
Anything else that escapes is a bug and keeps its traceback.
"""

from __future__ import annotations


class FinebenchError(Exception):
    """A user-caused error (recipe, dataset, path, archive); ``exit_code`` is what the CLI returns."""

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class Interrupted(FinebenchError):
    """The user stopped the command (Ctrl-C); the message says what is kept and how to go on.

    Exit code 130 is the shell's convention for a process ended by SIGINT (128 + the signal's
    number: 143 for SIGTERM), so scripts and schedulers can tell an interruption from a failure.
    """

    def __init__(self, message: str, exit_code: int = 130) -> None:
        super().__init__(message, exit_code=exit_code)
