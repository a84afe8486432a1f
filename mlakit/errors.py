"""The one exception type the library raises for bad user input (the CLI prints it, no traceback)."""


class MlakitError(ValueError):
    """Invalid input: a bad config, file, prompt or argument. The message says what and what is valid."""
