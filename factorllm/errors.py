"""User-facing errors: the CLI prints their message on one line and exits with status 2."""


class FactorLLMError(Exception):
    """Base of errors caused by what the user gave (a path, a flag, a file), not by a bug."""


class SourceError(FactorLLMError):
    """A model source that cannot be loaded: missing, unsupported, corrupt or pickle-only."""


class UsageError(FactorLLMError):
    """Arguments that are individually valid but do not fit together or this model."""
