"""The one error type the data pipeline raises for bad input."""

from __future__ import annotations


class SampleError(ValueError):
    """A sample that cannot be turned into training tensors.

    Carries the annotation file and the sample index so the message tells the user exactly where
    to look; `--skip_bad_samples` catches this type (and only this type) to skip and count.
    """

    def __init__(self, reason: str, file: str | None = None, index: int | None = None):
        self.reason = reason
        self.file = file
        self.index = index
        where = []
        if file is not None:
            where.append(f"file {file}")
        if index is not None:
            where.append(f"sample {index}")
        super().__init__(f"{', '.join(where)}: {reason}" if where else reason)

    def located(self, file: str | None, index: int | None) -> "SampleError":
        """The same error with the location filled in where it was missing."""
        return SampleError(self.reason, self.file or file, self.index if self.index is not None else index)
