"""The one exception type for user mistakes: the scripts turn it into one line on stderr and exit code 2."""


class UserError(Exception):
    """A mistake the user can fix (a flag, a key, a file). The message names it and says what to change."""
