"""Training: a decoder LM from scratch (:mod:`trainer`), token data (:mod:`data`), distillation of
converted models (:mod:`distill`) and the latent-size study (:mod:`study`)."""

from mlakit.text.tokenizer import ByteTokenizer, load_tokenizer
from mlakit.train.data import TokenDataset, build_token_file
from mlakit.train.presets import TRAIN_SIZES, training_config
from mlakit.train.trainer import TrainConfig, Trainer, TrainResult

__all__ = [
    "TRAIN_SIZES",
    "ByteTokenizer",
    "TokenDataset",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "build_token_file",
    "load_tokenizer",
    "training_config",
]
