"""User-facing errors: one line, non-zero exit, nothing half-written left behind."""


class ConceptGuardError(Exception):
    """An error caused by the user's input or environment.

    The CLI prints ``error: <message>`` on one line and exits with status 2; the message must say
    what is wrong and, where possible, what to do about it.
    """

    exit_code = 2

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))
