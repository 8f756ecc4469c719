"""Tiny HuggingFace models built offline for tests: configs with random weights (fixed seed),
saved with `save_pretrained`, and a WordPiece tokenizer trained on a few local sentences.

Nothing is downloaded: these stand in for the BERT embedders, cross-encoders, Whisper and ViT/CLIP
encoders that teams serve, at sizes a 2-core CPU runs in milliseconds.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

_spec = importlib.util.spec_from_file_location(
    "build_tiny_models", Path(__file__).resolve().parents[2] / "scripts" / "build_tiny_models.py"
)
_BUILD = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_BUILD)

CORPUS = [
    "hetforge plans optimizes and serves agent pipelines on mixed hardware",
    "an embedding model turns a query into a vector",
    "a reranker scores a query against each document",
    "the verifier checks every candidate on fresh inputs",
    "what is the capital of france paris is the capital of france",
]


def tokenizer(out: Path):
    """The example models' WordPiece tokenizer (scripts/build_tiny_models.py), trained on CORPUS, 200 tokens."""
    return _BUILD.tokenizer(out, corpus=CORPUS, vocab_size=200, max_length=64)


def bert(out: Path, classifier: bool = False, seed: int = 0) -> Path:
    """A 2-layer BERT (hidden 32) with its tokenizer: an embedder, or a cross-encoder with one relevance logit."""
    from transformers import BertConfig, BertForSequenceClassification, BertModel

    tok = tokenizer(out)
    config = BertConfig(
        vocab_size=len(tok),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=1,
    )
    torch.manual_seed(seed)
    model = (BertForSequenceClassification if classifier else BertModel)(config).eval()
    model.save_pretrained(out)
    return out


def whisper_encoder(out: Path, seed: int = 0) -> Path:
    """A 2-layer Whisper (d_model 32, 16 mel bins, 32 frames) with its feature extractor."""
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperModel

    config = WhisperConfig(
        vocab_size=64,
        d_model=32,
        encoder_layers=2,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        num_mel_bins=16,
        max_source_positions=16,
        max_target_positions=16,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=1,
    )
    torch.manual_seed(seed)
    WhisperModel(config).eval().save_pretrained(out)
    WhisperFeatureExtractor(feature_size=16, chunk_length=1, hop_length=500).save_pretrained(out)
    return out


def vit(out: Path, seed: int = 0) -> Path:
    """A 2-layer ViT (hidden 32) on 32x32 images with 8x8 patches, with its image processor."""
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    config = ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32, patch_size=8
    )
    torch.manual_seed(seed)
    ViTModel(config, add_pooling_layer=False).eval().save_pretrained(out)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(out)
    return out


def t5_encoder(out: Path, seed: int = 0) -> Path:
    """A 2-layer T5 (d_model 32): served as an embedder, its encoder is the stage."""
    from transformers import T5Config, T5Model

    config = T5Config(
        vocab_size=200,
        d_model=32,
        d_kv=16,
        d_ff=64,
        num_layers=2,
        num_decoder_layers=1,
        num_heads=2,
        decoder_start_token_id=0,
    )
    torch.manual_seed(seed)
    T5Model(config).eval().save_pretrained(out)
    return out
