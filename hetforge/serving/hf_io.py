"""Client data in and out of a HuggingFace model stage: the tokenizer, feature extractor or image processor
runs here, in the replica, and requests are padded up to the stage's declared serving buckets.

| task             | request JSON                                              | response JSON                          |
|------------------|-----------------------------------------------------------|----------------------------------------|
| `embedding`      | `{"text": s}` / `{"texts": [s, ...]}`                     | `{"embedding": [...]}` / `{"embeddings": [[...], ...]}` |
| `classification` | `{"text": s}` / `{"texts": [...]}` / `{"query": q, "documents": [...]}` | `{"scores": ...}` (+ `"label"` with more than one label) |
| `audio_encoder`  | `{"audio": [floats], "sampling_rate": n}`                 | `{"embedding": [...]}`                 |
| `vision_encoder` | `{"image": base64 PNG or JPEG}`                           | `{"embedding": [...]}`                 |

Classification scores: with one label (a cross-encoder's relevance) the raw logit per text or document;
with several, each row's softmax as `{label: probability}` and the best `label` (names from the stage's
`labels`, else the model config's `id2label`). `documents` are scored as (query, document) pairs.

Buckets: the verifier checks the stage on every declared bucket (`batch` rows, `seq` tokens), so the
replica runs only those shapes. A request is tokenized without padding beyond its own longest row; the
batch of requests that `serve.batch` collects is packed into groups that fit a bucket, each group padded
to the smallest bucket that holds it (tokens with the pad id and a zero attention mask, rows with copies
of a real row whose outputs are dropped), run once, and split back. A request that no bucket holds is
the client's 422, naming the limit. Without declared buckets the stage has one: batch 1 and `max_length`
tokens (what the verifier checks then).

`transformers` and `PIL` are imported inside functions: optional heavy dependencies, needed
only by replicas of HuggingFace stages.
"""

from __future__ import annotations

import base64
import binascii
import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hetforge.core.hf import DTYPES, TEXT_TASKS, HfError, HfSource, read_config, shapes
from hetforge.serving.dataflow import StageError

MAX_TEXTS = 4096  # rows per request a replica tokenizes at most, whatever the buckets (a bound on the work)
MAX_AUDIO_SAMPLES = 1 << 24  # ~17 min at 16 kHz
MAX_IMAGE_BYTES = 32 << 20


@dataclass(frozen=True)
class Bucket:
    """One serving shape: rows and, for text tasks, tokens per row."""

    batch: int
    seq: int | None

    def holds(self, rows: int, seq: int | None) -> bool:
        return rows <= self.batch and (seq is None or self.seq is None or seq <= self.seq)

    def __str__(self) -> str:
        return f"batch {self.batch}" + (f" seq {self.seq}" if self.seq is not None else "")


def buckets_of(source: HfSource, declared: list[dict]) -> list[Bucket]:
    """The stage's buckets, smallest first; a missing `batch` is 1 and a missing `seq` is `max_length`, as the
    verifier's inputs make them (`hetforge.core.hf.make_inputs`)."""
    text = source.task in TEXT_TASKS
    out = {
        Bucket(int(b.get("batch", 1)), int(b.get("seq", source.max_length)) if text else None)
        for b in (declared or [{}])
    }
    return sorted(out, key=lambda b: (b.batch * (b.seq or 1), b.batch))


class HfIO:
    """One HuggingFace stage's request decoding, bucketed batching and response encoding."""

    def __init__(self, stage, source: HfSource, folder: Path):
        self.stage_name, self.source, self.task = stage.name, source, source.task
        self.buckets = buckets_of(source, list(stage.buckets))
        self.dtype = DTYPES[source.dtype]
        config = read_config(folder)
        id2label = {int(k): v for k, v in (config.get("id2label") or {}).items()}
        count = len(id2label) or int(config.get("num_labels", 1))
        self.labels = (
            list(stage.labels)
            if stage.labels and len(stage.labels) == count
            else [id2label.get(i, f"LABEL_{i}") for i in range(count)]
        )
        import transformers  # optional: only HuggingFace stages load it

        kwargs = {"local_files_only": True}
        if self.task in TEXT_TASKS:
            self.processor = transformers.AutoTokenizer.from_pretrained(str(folder), **kwargs)
            self.pad_id = self.processor.pad_token_id or 0
        elif self.task == "audio_encoder":
            self.processor = transformers.AutoFeatureExtractor.from_pretrained(str(folder), **kwargs)
            self._check_features(folder)
        else:
            # the slow processor needs only PIL; the fast one needs torchvision, which CPU installs do not have
            self.processor = transformers.AutoImageProcessor.from_pretrained(str(folder), use_fast=False, **kwargs)

    def _check_features(self, folder: Path) -> None:
        """The feature extractor must make the features the model takes: a mismatch is the model folder's, found at
        start-up rather than on every request."""
        rate = getattr(self.processor, "sampling_rate", 16000)
        made = self._features(np.zeros(rate // 10, dtype=np.float32), rate)
        dims = shapes(folder, self.task)
        if list(made.shape[1:]) != [dims.mel_bins, dims.frames]:
            raise HfError(
                f"{folder}: the feature extractor makes features of shape {list(made.shape[1:])}, the model takes "
                f"[{dims.mel_bins}, {dims.frames}] (preprocessor_config.json does not fit config.json)"
            )

    def _features(self, samples, rate: int) -> torch.Tensor:
        features = self.processor(samples, sampling_rate=rate, return_tensors="pt")
        key = "input_features" if "input_features" in features else "input_values"
        return features[key].to(self.dtype)

    # ------------------------------------------------------------------ requests
    def _error(self, field: str, why: str) -> StageError:
        return StageError(f"stage {self.stage_name}, field {field}: {why}", 422)

    def decode(self, payload: Any) -> list[torch.Tensor]:
        """The request's model inputs, unpadded past its own longest row: text [ids, mask], else [features]."""
        if not isinstance(payload, dict):
            raise StageError(
                f"stage {self.stage_name}: expected a JSON object ({self._forms()}), got {type(payload).__name__}", 422
            )
        if self.task in TEXT_TASKS:
            tensors = self._text(payload)
        elif self.task == "audio_encoder":
            tensors = [self._audio(payload)]
        else:
            tensors = [self._image(payload)]
        rows, seq = tensors[0].shape[0], tensors[0].shape[1] if self.task in TEXT_TASKS else None
        if not any(b.holds(rows, seq) for b in self.buckets):
            field = self._form(payload)
            size = f"{rows} row(s)" + (f" of {seq} tokens" if seq is not None else "")
            raise self._error(
                field,
                f"{size} is more than any serving bucket holds (largest: {self.buckets[-1]}; "
                f"buckets: {', '.join(map(str, self.buckets))})",
            )
        return tensors

    def _forms(self) -> str:
        return {
            "embedding": 'fields "text" or "texts"',
            "classification": 'fields "text", "texts", or "query" and "documents"',
            "audio_encoder": 'fields "audio" and "sampling_rate"',
            "vision_encoder": 'field "image"',
        }[self.task]

    def _form(self, payload: dict) -> str:
        for field in ("documents", "texts", "text", "audio", "image"):
            if field in payload:
                return field
        raise StageError(
            f"stage {self.stage_name}: expected {self._forms()}; got {', '.join(map(str, payload)) or 'no fields'}",
            422,
        )

    def _text(self, payload: dict) -> list[torch.Tensor]:
        form = self._form(payload)
        pairs = None
        if form == "documents" and self.task == "classification":
            query, documents = payload.get("query"), payload["documents"]
            if not isinstance(query, str):
                raise self._error("query", f"a string to score the documents against, got {type(query).__name__}")
            texts = self._strings("documents", documents)
            texts, pairs = [query] * len(texts), texts
        elif form == "texts":
            texts = self._strings("texts", payload["texts"])
        elif form == "text":
            if not isinstance(payload["text"], str):
                raise self._error("text", f"a string, got {type(payload['text']).__name__}")
            texts = [payload["text"]]
        else:
            raise StageError(f"stage {self.stage_name}: expected {self._forms()}; got field {form}", 422)
        encoded = self.processor(
            texts,
            pairs,
            truncation=True,
            max_length=self.source.max_length,
            padding="longest",
            return_tensors="pt",
        )
        return [encoded["input_ids"], encoded["attention_mask"].to(torch.int64)]

    def _strings(self, field: str, value: Any) -> list[str]:
        if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
            raise self._error(field, "a non-empty list of strings")
        if len(value) > MAX_TEXTS:
            raise self._error(field, f"{len(value)} strings, more than {MAX_TEXTS}")
        return value

    def _audio(self, payload: dict) -> torch.Tensor:
        audio, rate = payload.get("audio"), payload.get("sampling_rate")
        if not isinstance(audio, list) or not audio or not all(isinstance(v, (int, float)) for v in audio):
            raise self._error("audio", "a non-empty list of samples (numbers, mono)")
        if len(audio) > MAX_AUDIO_SAMPLES:
            raise self._error("audio", f"{len(audio)} samples, more than {MAX_AUDIO_SAMPLES}")
        want = getattr(self.processor, "sampling_rate", None)
        if not isinstance(rate, int) or isinstance(rate, bool) or rate <= 0:
            raise self._error("sampling_rate", f"the samples per second, an integer (the model takes {want})")
        if want is not None and rate != want:
            raise self._error("sampling_rate", f"got {rate}; the model takes {want} Hz audio (resample it first)")
        return self._features(np.asarray(audio, dtype=np.float32), rate)

    def _image(self, payload: dict) -> torch.Tensor:
        from PIL import Image, UnidentifiedImageError  # optional: only vision stages need pillow

        data = payload.get("image")
        if not isinstance(data, str):
            raise self._error("image", "a base64-encoded PNG or JPEG")
        try:
            raw = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError) as err:
            raise self._error("image", f"not base64 ({err})") from None
        if len(raw) > MAX_IMAGE_BYTES:
            raise self._error("image", f"{len(raw)} bytes, more than {MAX_IMAGE_BYTES}")
        try:
            image = Image.open(io.BytesIO(raw))
            if image.format not in ("PNG", "JPEG"):
                raise self._error("image", f"a PNG or JPEG, got {image.format}")
            image = image.convert("RGB")
        except (UnidentifiedImageError, OSError) as err:
            raise self._error("image", f"not a readable PNG or JPEG ({type(err).__name__})") from None
        return self.processor(images=image, return_tensors="pt")["pixel_values"].to(self.dtype)

    # ------------------------------------------------------------------ batches
    def run(self, run: Callable[..., torch.Tensor], items: list[list[torch.Tensor]]) -> list[torch.Tensor]:
        """Each request's output rows: requests packed into groups a bucket holds, each group run once, padded."""
        results: list[Any] = [None] * len(items)
        for group, bucket in self._groups(items):
            inputs = self._pad([items[i] for i in group], bucket)
            out = run(*inputs)
            start = 0
            for i in group:
                rows = items[i][0].shape[0]
                results[i] = out[start : start + rows]
                start += rows
        return results

    def _groups(self, items: list[list[torch.Tensor]]) -> list[tuple[list[int], Bucket]]:
        """Requests in arrival order, packed greedily: a request joins the open group while a bucket holds both."""
        text = self.task in TEXT_TASKS
        out, group, rows, seq = [], [], 0, 0
        for i, tensors in enumerate(items):
            n, length = tensors[0].shape[0], tensors[0].shape[1] if text else 0
            if group and self._bucket(rows + n, max(seq, length) if text else None) is None:
                out.append((group, self._bucket(rows, seq if text else None)))
                group, rows, seq = [], 0, 0
            group.append(i)
            rows, seq = rows + n, max(seq, length)
        if group:
            out.append((group, self._bucket(rows, seq if text else None)))
        return out

    def _bucket(self, rows: int, seq: int | None) -> Bucket | None:
        return next((b for b in self.buckets if b.holds(rows, seq)), None)

    def _pad(self, requests: list[list[torch.Tensor]], bucket: Bucket) -> list[torch.Tensor]:
        """The group's inputs at exactly the bucket's shape."""
        if self.task in TEXT_TASKS:
            ids = [_pad_seq(r[0], bucket.seq, self.pad_id) for r in requests]
            masks = [_pad_seq(r[1], bucket.seq, 0) for r in requests]
            merged = [torch.cat(ids), torch.cat(masks)]
        else:
            merged = [torch.cat([r[0] for r in requests])]
        missing = bucket.batch - merged[0].shape[0]
        if missing > 0:  # copies of the first row: a real input, so no all-padding row reaches attention
            merged = [torch.cat([x, x[:1].expand(missing, *x.shape[1:])]) for x in merged]
        return merged

    # ------------------------------------------------------------------ responses
    def encode(self, out: torch.Tensor, payload: dict) -> dict:
        """The response JSON of one request from its output rows."""
        rows = out.detach().float().cpu()
        single = self.task not in TEXT_TASKS or self._form(payload) == "text"
        if self.task != "classification":
            return {"embedding": rows[0].tolist()} if single else {"embeddings": rows.tolist()}
        if len(self.labels) <= 1:
            scores = rows[:, 0].tolist()
            return {"scores": scores[0] if single else scores}
        probs = rows.softmax(-1)
        scored = [dict(zip(self.labels, p.tolist(), strict=True)) for p in probs]
        best = [self.labels[int(i)] for i in probs.argmax(-1)]
        return {"scores": scored[0], "label": best[0]} if single else {"scores": scored, "label": best}


def _pad_seq(x: torch.Tensor, seq: int, value: int) -> torch.Tensor:
    # x: [rows, L] -> [rows, seq]
    return torch.nn.functional.pad(x, (0, seq - x.shape[1]), value=value)
