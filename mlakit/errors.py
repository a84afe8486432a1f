"""The one exception type the library raises for bad user input (the CLI prints it, no traceback)."""


class MlakitError(ValueError):
    """Invalid input: a bad config, file, prompt or argument. The message says what and what is valid."""


def invalid(owner: str, name: str, value: object, allowed: str) -> MlakitError:
    """The error for a config field with a bad value: ``Owner.name=value is invalid: allowed``.

    Every frozen config validates in ``__post_init__`` and raises this (a ``ValueError``), so the
    message always names the field, the value and what would be valid.
    """
    return MlakitError(f"{owner}.{name}={value!r} is invalid: {allowed}")
