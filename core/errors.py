"""One exception type for mistakes a user can fix.

Every command turns it into a one-line `Error: ...` and exit code 1 (click prints it), never a
stack trace. Raise it at the boundary with the flag or file at fault named in the message.
"""

from __future__ import annotations

import click


class UserError(click.ClickException):
    """Bad input: names the flag or file at fault and what to do about it."""


def parse_list(text: str, kind, flag: str) -> list:
    """A comma-separated option value (--seq-lens 512,1024) -> [kind(x), ...], one-line errors."""
    try:
        values = [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"{flag} {text}: expected comma-separated {kind.__name__} values") from None
    if not values:
        raise UserError(f"{flag}: give at least one value")
    return values
