"""Mixed text-image data: webdataset shards -> tokenised documents -> packed, resumable batches."""

from train.data.config import CorpusConfig, DataConfig, ImageConfig, SourceConfig
from train.data.loader import Loader, build_dataloader
from train.data.tokenizer import TokenizerConfig, build_tokenizer

__all__ = [
    "CorpusConfig", "DataConfig", "ImageConfig", "Loader", "SourceConfig", "TokenizerConfig", "build_dataloader",
    "build_tokenizer",
]
