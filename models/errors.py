"""The one error type the decision models raise for input they cannot use."""

from __future__ import annotations


class ModelInputError(ValueError):
    """An input record that cannot be used: names the field, value and reason.

    The agents catch it per record and dead-letter the record with this message, so
    one bad record never stops the decider.
    """

    def __init__(self, field: str, value: object, reason: str) -> None:
        self.field = field
        self.value = value
        self.reason = reason
        super().__init__(f"{field}={value!r}: {reason}")
