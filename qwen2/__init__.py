"""Qwen2 Studio's runtime: a hand-written Qwen2 / Qwen2.5 in PyTorch.

    import qwen2
    model = qwen2.load_model("Qwen/Qwen2-0.5B-Instruct")
    tok = qwen2.Tokenizer.from_pretrained("Qwen/Qwen2-0.5B-Instruct")
    ids = torch.tensor([tok.encode_chat([{"role": "user", "content": "Hi"}])])
    print(tok.decode(list(qwen2.generate(model, ids, max_new_tokens=32))))
"""

from .config import Qwen2Config
from .errors import (CheckpointError, ConfigError, ContextLengthError, GenerationError, ModelNotFoundError,
                     Qwen2Error, TokenizerError)
from .generate import DecodeSession, generate, generate_batch
from .loading import load_model
from .model import Qwen2ForCausalLM
from .tokenizer import Tokenizer

__all__ = [
    "CheckpointError", "ConfigError", "ContextLengthError", "DecodeSession", "GenerationError",
    "ModelNotFoundError", "Qwen2Config", "Qwen2Error", "Qwen2ForCausalLM", "Tokenizer", "TokenizerError",
    "generate", "generate_batch", "load_model",
]
