"""The one exception type users see: a one-line message naming the file, field or tensor."""


class EvoError(Exception):
    """A user-facing error. The CLI prints ``str(err)`` on one line and exits non-zero."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))
