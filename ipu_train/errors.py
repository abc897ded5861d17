"""The exceptions the scripts turn into one line on stderr, with no traceback: `error: ...` and the exit code."""


class UserError(Exception):
    """A mistake the user can fix (a flag, a key, a file). The message names it and says what to change."""

    exit_code = 2


def one_line(err, limit=None):
    """An exception's text on one line (at most `limit` characters), or its type's name when it has none."""
    text = " ".join(str(err).split())[:limit]
    return text or type(err).__name__


class RunFailed(Exception):
    """The run could not go on (a full disk, a diverged loss). What was saved before stays as it was."""

    exit_code = 1
