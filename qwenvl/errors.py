"""The base type of errors the user fixes: bad data, bad flags, a missing folder.

Entry points print such an error as one line and exit 2; every other exception is a bug and keeps its
traceback. Each subclass says in `hint` what the user can do about it.
"""

from __future__ import annotations


class UserError(ValueError):
    """Bad input from the user, not a bug: reported as one line, exit code 2."""

    hint: str = ""

    def one_line(self) -> str:
        """The message with the hint, whitespace (newlines of decoder messages included) collapsed."""
        text = " ".join(str(self).split())
        return f"{text} ({self.hint})" if self.hint else text


class FlagError(UserError):
    """A flag value that cannot work; the message names the flag, the value and what is allowed."""
