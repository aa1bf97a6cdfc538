"""Errors a user can act on. The CLI prints them as one line and exits 2."""


class UserError(Exception):
    """Bad input: a config key, a file, a line. The message names where."""


class NotSupportedYet(UserError):
    """A config value that parses but whose feature does not exist yet."""

    def __init__(self, what: str):
        super().__init__(f"not supported yet: {what}")


class NothingHappened(RuntimeError):
    """A step that should have changed or measured something did nothing (e.g. a quantizer that
    touched zero layers, an engine whose scores are identical for every choice)."""


class EngineFault(RuntimeError):
    """An engine gave no usable answer: its process crashed, or it returned a NaN or +inf score.
    The CLI exits 3; a candidate's fault fails that candidate and the run goes on."""


class BadEngineOutput(EngineFault):
    """An engine returned a value that is no log-probability (NaN or +inf). The message names the
    model, the engine and the item."""
