"""The one exception type for problems a user can fix (bad file, bad flag, missing download),
and the one warning type for things a user should know (skipped images, ...)."""


class BigTransferError(Exception):
    """A user-fixable problem; the message says what was wrong and what to do.

    The CLI prints it as one line and exits with code 2, without a traceback.
    """


class BigTransferWarning(UserWarning):
    """Something the user should know that does not stop the work; the CLI prints it as one line
    (`bigtransfer: warning: ...`)."""
