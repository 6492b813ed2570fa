"""One exception type for mistakes a user can fix.

Every command turns it into a one-line `Error: ...` and exit code 1 (click prints it), never a
stack trace. Raise it at the boundary with the flag or file at fault named in the message.
"""

from __future__ import annotations

import click


class UserError(click.ClickException):
    """Bad input: names the flag or file at fault and what to do about it."""
