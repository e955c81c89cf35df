"""Text data for the bundled MoE language model."""

from .text import ByteTextDataModule, ByteWindowDataset, default_corpus_bytes

__all__ = ["ByteTextDataModule", "ByteWindowDataset", "default_corpus_bytes"]
