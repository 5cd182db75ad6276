"""The error every pruning entry point raises for bad input; the input model is never touched."""


class PruningError(ValueError):
    """Bad pruning request (method, sparsity, layer names, untraceable model): the message says the fix."""
