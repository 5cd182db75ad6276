"""The error every pruning entry point raises for bad input; the input model is never touched."""


class PruningError(ValueError):
    """Bad pruning request (method, sparsity, layer names, untraceable model): the message says the fix."""


def first_line(error: BaseException) -> str:
    """The first line of an error's message (empty if it has none): what a one-line refusal quotes of a library's own
    error."""
    text = str(error).strip()
    return text.splitlines()[0] if text else ""
