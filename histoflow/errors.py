"""Errors a user can act on: one line naming the slide or field and the fix."""


class HistoflowError(Exception):
    """Base class. ``str(err)`` is a single line that says what is wrong and how to fix it."""


class InputError(HistoflowError):
    """The config or the samples sheet is wrong."""


class SlideError(HistoflowError):
    """A slide cannot be downloaded, opened or read."""

    def __init__(self, slide_id: str, message: str):
        self.slide_id = slide_id
        super().__init__(f"slide {slide_id!r}: {message}")


class OutputError(HistoflowError, OSError):
    """An output cannot be written (disk full, file-size or quota limit); nothing half-written
    is left at its path. Still an OSError, for callers that handle those."""

    def __str__(self) -> str:
        return self.strerror or super().__str__()
