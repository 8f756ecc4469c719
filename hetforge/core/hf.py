"""HuggingFace transformers as model stages: a local model folder (or a model id already in the local
cache), a task, and the tokenizer or processor that turns a client's text, audio or image into the
model's tensors inside the replica.

The stage's computation is `HfStageModule`: tensors in, one tensor out, so the verifier, the
planner and the kernel agents treat it like any other module:

| task             | model class                              | inputs                        | output                      |
|------------------|------------------------------------------|-------------------------------|-----------------------------|
| `embedding`      | AutoModel (an encoder-decoder's encoder) | input_ids, attention_mask     | pooled (mean or CLS), L2-normalized if asked: [B, H] |
| `classification` | AutoModelForSequenceClassification       | input_ids, attention_mask     | logits [B, labels] (a cross-encoder's relevance: [B, 1]) |
| `audio_encoder`  | AutoModel's encoder (Whisper-style)      | input_features [B, mels, T]   | mean over time of the last hidden state [B, H] |
| `vision_encoder` | AutoModel (ViT) or the vision tower (CLIP) | pixel_values [B, C, S, S]   | the CLS hidden state [B, H] |

`transformers` is imported inside functions: it is an optional dependency (the `models` extra in pyproject.toml) and
the GPU host's optimizer and kernels run without importing it unless a stage needs it. Nothing is
downloaded: every load passes `local_files_only=True`, and a model id missing from the local cache
is one `ProblemError` naming it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from hetforge.core.files import file_digest

TASKS = ("embedding", "classification", "audio_encoder", "vision_encoder")
POOLINGS = ("mean", "cls")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TEXT_TASKS = ("embedding", "classification")


class HfError(Exception):
    """A HuggingFace stage cannot be loaded: the message names the model and the fix."""


@dataclass(frozen=True)
class HfSource:
    """What a HuggingFace stage names: the model (folder or cached id), its task and how to pool."""

    model: str  # an absolute folder, or a model id in the local HuggingFace cache
    task: str
    pooling: str = "mean"  # embedding: mean over the attention mask, or the first token's state
    normalize: bool = True  # embedding: L2-normalize the pooled vector
    max_length: int = 128  # text tasks: tokens per sequence, truncating longer ones
    dtype: str = "float32"

    def to_json(self) -> dict:
        return dict(vars(self))

    @classmethod
    def from_json(cls, doc: dict) -> HfSource:
        return cls(**doc)


def model_folder(model: str, base_dir: str | Path | None = None) -> Path:
    """The local folder of `model`: a folder (relative to `base_dir`), else a model id in the local cache."""
    path = Path(model)
    if not path.is_absolute() and base_dir is not None:
        path = Path(base_dir) / path
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise HfError(f"{path}: not a HuggingFace model folder (no config.json); save one with save_pretrained()")
        return path.resolve()
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError as err:
        raise HfError(
            f'model "{model}" is not a folder and huggingface_hub is not installed to look it up: {err}'
        ) from None
    try:
        return Path(snapshot_download(model, local_files_only=True))
    except (LocalEntryNotFoundError, ValueError, OSError) as err:
        cache = os.environ.get("HF_HUB_CACHE") or os.environ.get("HF_HOME") or "~/.cache/huggingface"
        raise HfError(
            f'model "{model}" is neither a folder here nor in the local HuggingFace cache ({cache}); nothing is '
            f"downloaded at run time: download it on a connected machine and point `model:` at its folder "
            f"({type(err).__name__})"
        ) from None


def read_config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


class HfStageModule(nn.Module):
    """A HuggingFace model as a stage: tensors in, one tensor out (see the module's table)."""

    def __init__(
        self, model_dir: str, task: str, pooling: str = "mean", normalize: bool = True, dtype: str = "float32"
    ):
        super().__init__()
        if task not in TASKS:
            raise HfError(f'Got "{task}" for task: one of {", ".join(TASKS)}.')
        import transformers

        self.task, self.pooling, self.normalize = task, pooling, normalize
        kwargs = {"local_files_only": True, "dtype": DTYPES[dtype]}
        if task == "classification":
            self.model = transformers.AutoModelForSequenceClassification.from_pretrained(model_dir, **kwargs)
        else:
            model = transformers.AutoModel.from_pretrained(model_dir, **kwargs)
            if getattr(model.config, "is_encoder_decoder", False) and hasattr(model, "get_encoder"):
                model = model.get_encoder()  # T5, BART, Whisper: the encoder is the stage
            elif task == "vision_encoder" and hasattr(model, "vision_model"):
                model = model.vision_model  # CLIP/SigLIP: the vision tower
            self.model = model
        self.model.eval()

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        if self.task in TEXT_TASKS:
            input_ids, attention_mask = inputs
            out = self.model(input_ids=input_ids, attention_mask=attention_mask)
            if self.task == "classification":
                return out.logits
            hidden = out.last_hidden_state  # [B, S, H]
            if self.pooling == "cls":
                pooled = hidden[:, 0]
            else:
                mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # padding contributes nothing
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
            return nn.functional.normalize(pooled, dim=-1) if self.normalize else pooled
        if self.task == "audio_encoder":
            return self.model(input_features=inputs[0]).last_hidden_state.mean(1)
        return self.model(pixel_values=inputs[0]).last_hidden_state[:, 0]


@dataclass(frozen=True)
class HfShapes:
    """The tensor signature of a HuggingFace stage, read from its config."""

    vocab_size: int = 0
    mel_bins: int = 0
    frames: int = 0
    channels: int = 0
    image_size: int = 0


def shapes(folder: Path, task: str) -> HfShapes:
    cfg = read_config(folder)
    vision = cfg.get("vision_config", cfg)
    if task in TEXT_TASKS:
        return HfShapes(vocab_size=int(cfg["vocab_size"]))
    if task == "audio_encoder":
        return HfShapes(
            mel_bins=int(cfg.get("num_mel_bins", 80)), frames=2 * int(cfg.get("max_source_positions", 1500))
        )
    return HfShapes(channels=int(vision.get("num_channels", 3)), image_size=int(vision.get("image_size", 224)))


def make_inputs(source: HfSource, folder: Path, batch: int = 1, seq: int | None = None) -> list[torch.Tensor]:
    """Random model inputs for `batch` rows, drawn from torch's global generator.

    Text: token ids over the whole vocabulary and an attention mask whose rows have random lengths
    (the last row full), so that padding is part of every check.
    """
    dims = shapes(folder, source.task)
    if source.task in TEXT_TASKS:
        seq = seq or source.max_length
        ids = torch.randint(0, dims.vocab_size, (batch, seq))
        lengths = torch.randint(1, seq + 1, (batch,))
        lengths[-1] = seq
        mask = (torch.arange(seq)[None, :] < lengths[:, None]).long()
        return [ids, mask]
    if source.task == "audio_encoder":
        return [torch.randn(batch, dims.mel_bins, dims.frames).to(DTYPES[source.dtype])]
    return [torch.randn(batch, dims.channels, dims.image_size, dims.image_size).to(DTYPES[source.dtype])]


def fingerprint_source(folder: Path, source: HfSource) -> str:
    """What the registry keys a HuggingFace stage by: its config, the digest of every weights file, the task's
    settings and this module's own source (the wrapper is part of the computation)."""
    parts = [
        (folder / "config.json").read_text(),
        json.dumps({k: v for k, v in vars(source).items() if k != "model"}, sort_keys=True),
        Path(__file__).read_text(),
    ]
    for weights in sorted([*folder.glob("*.safetensors"), *folder.glob("*.bin")]):
        parts.append(f"{weights.name} {file_digest(weights)}")
    return "\0".join(parts)
