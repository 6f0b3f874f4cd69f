"""The one user-facing error type: its message is a single line naming the problem and the fix.

The CLI prints ``str(err)`` and exits non-zero; anything else reaching the user is a bug.
"""

from __future__ import annotations


class SpecdecError(Exception):
    """A problem the user can fix; the message is collapsed to one line."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split()))
