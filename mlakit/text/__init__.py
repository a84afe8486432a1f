"""Text below every consumer: corpora (built-in genres, user files), their formats, and tokenizers.

Conversion calibrates on it, evaluation scores on it, training and distillation learn from it and
the engine tokenizes with it, so it sits under all of them and imports none of them.
"""

from mlakit.text.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer, load_tokenizer, saved_tokenizer

__all__ = ["ByteTokenizer", "HFTokenizer", "Tokenizer", "load_tokenizer", "saved_tokenizer"]
