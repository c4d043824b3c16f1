"""The one exception type the pipeline raises for bad input."""


class NdxInputError(ValueError):
    """Raised for bad user input: the message names the input and says what is wrong."""
