"""The one exception type for problems a user can fix (bad file, bad flag, missing download)."""


class BigTransferError(Exception):
    """A user-fixable problem; the message says what was wrong and what to do.

    The CLI prints it as one line and exits with code 2, without a traceback.
    """
