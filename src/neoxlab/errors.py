"""neoxlab's own error type: a user mistake the CLI reports as one line and exit code 2."""


class NeoxlabError(Exception):
    """A problem the user can fix (bad config, missing data, mismatched files).

    The message says what is wrong; the optional hint says how to fix it.
    """

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message

    def line(self) -> str:
        """The one line the CLI prints: `error: <message> (hint: <hint>)`."""
        return f"error: {self.message}" + (f" (hint: {self.hint})" if self.hint else "")

    def _render_traceback_(self) -> list[str]:
        # IPython (Jupyter, Colab) shows this instead of a traceback; the cell still fails, so
        # *Run all* stops there, as the CLI stops with exit code 2.
        return [self.line()]
