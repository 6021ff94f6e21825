"""The project's exception types.

Each one subclasses the builtin a caller would expect (ValueError for bad values, OSError for
missing files) so `except ValueError` keeps working, while `except Qwen2Error` catches them all.
Messages name the file, tensor or parameter at fault and what was expected.
"""


class Qwen2Error(Exception):
    """Base class of every error this package raises on purpose."""


class ModelNotFoundError(Qwen2Error, OSError):
    """A local directory or hub repo id that cannot be found, downloaded or read from the cache."""


class ConfigError(Qwen2Error, ValueError):
    """A missing, unreadable or unsupported config.json."""


class CheckpointError(Qwen2Error, ValueError):
    """Weights that are missing, of the wrong shape, or in a format we refuse to load (pickle)."""


class GenerationError(Qwen2Error, ValueError):
    """Bad generation input: sampling settings, token ids, or a prompt beyond the context."""


class ContextLengthError(GenerationError):
    """A prompt plus max_new_tokens that does not fit in max_position_embeddings."""


class TokenizerError(Qwen2Error, ValueError):
    """A missing or unreadable tokenizer file, or a chat template that fails to render."""


class LimitError(GenerationError):
    """A request over a serving limit (prompt tokens, new tokens, waiting requests)."""
