"""The error types the data pipeline raises for bad input."""

from __future__ import annotations

from qwenvl.errors import UserError

PROBLEM_KINDS = (
    "annotation_file",
    "malformed_json",
    "empty_dataset",
    "structure",
    "tag_count",
    "tag_in_answer",
    "missing_media",
    "corrupt_media",
    "unsupported_media",
    "too_large",
    "too_long",
    "encoding",
)


class SampleError(UserError):
    """A sample that cannot be turned into training tensors.

    Carries the annotation file, the sample index (and the JSONL line) so the message tells the user
    exactly where to look, and a `kind` from PROBLEM_KINDS for check_data's report. `--skip_bad_samples`
    catches this type (and only this type) to skip and count.
    """

    hint = "fix or remove the sample, or pass --skip_bad_samples to skip and count bad samples"

    def __init__(
        self,
        reason: str,
        file: str | None = None,
        index: int | None = None,
        line: int | None = None,
        kind: str = "structure",
    ):
        self.reason = reason
        self.file = file
        self.index = index
        self.line = line
        self.kind = kind
        super().__init__(self._message())

    def _message(self) -> str:
        where = []
        if self.file is not None:
            where.append(f"file {self.file}")
        if self.index is not None:
            where.append(f"sample {self.index}")
        if self.line is not None:
            where.append(f"line {self.line}")
        return f"{', '.join(where)}: {self.reason}" if where else self.reason

    def __reduce__(self):
        """Pickles with every field (loader worker processes send errors back)."""
        return type(self), (self.reason, self.file, self.index, self.line, self.kind)

    def located(self, file: str | None, index: int | None, line: int | None = None) -> "SampleError":
        """The same error with the location filled in where it was missing."""
        return type(self)(
            self.reason,
            self.file or file,
            self.index if self.index is not None else index,
            self.line if self.line is not None else line,
            self.kind,
        )


class DatasetError(SampleError):
    """A whole annotation file or dataset is unusable (missing, not JSON, empty): never skippable."""

    hint = "fix the annotation file or the --dataset_use entry"


def nothing_to_train(n_bad: int) -> DatasetError:
    """Every sample training met in a whole epoch was bad: stop instead of training on placeholders."""
    return DatasetError(
        f"all {n_bad} samples of an epoch are bad, nothing to train on (check_data.py lists them)",
        kind="empty_dataset",
    )
