"""Build the team-models example's models offline: a tiny BERT embedder and cross-encoder, and the team's
intent head checkpoint.

Nothing can be downloaded on these machines, so `examples/team_models.yaml` serves models built here from
small configs with random weights under a fixed seed. They say nothing useful; they exercise the real
HuggingFace loading, tokenization in the replica, bucketing, verification and serving paths in seconds.

    python scripts/build_tiny_models.py [--out examples/models] [--seed 0]

- `tiny-embedder/`: `BertModel`, hidden 32, 2 layers, saved with save_pretrained (safetensors), and a
  WordPiece tokenizer (the `tokenizers` library) trained on a fixed list of sentences.
- `tiny-cross-encoder/`: `BertForSequenceClassification` with one relevance logit, same tokenizer.
- `team_intent.safetensors`: the state_dict of `examples/models/team_intent.py:IntentHead`.
Each is skipped when it already exists with the same settings (a stamp file records them).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CORPUS = [
    "hetforge plans optimizes and serves agent pipelines on mixed hardware",
    "an embedding model turns a query into a vector",
    "a reranker scores a query against each document",
    "the verifier checks every candidate on fresh inputs",
    "what is the capital of france paris is the capital of france",
    "turn off the lights in the kitchen please",
    "how are you doing today",
    "what does hetforge do",
]
BERT = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "max_position_embeddings": 128,
}
INTENT = {"d_in": 32, "hidden": 512, "classes": 3}  # as examples/team_models.yaml constructs it


def _stamp(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def _fresh(stamp_file: Path, stamp: str) -> bool:
    return stamp_file.is_file() and json.loads(stamp_file.read_text()).get("stamp") == stamp


def tokenizer(
    out: Path, corpus: list[str] = CORPUS, vocab_size: int = 300, max_length: int = BERT["max_position_embeddings"]
):
    """A lowercase WordPiece tokenizer with BERT's special tokens and pair template, trained on `corpus`."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"], show_progress=False
    )
    tok.train_from_iterator(corpus, trainer)
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=max_length,
    )
    fast.save_pretrained(out)
    return fast


def bert(out: Path, seed: int, classifier: bool) -> Path:
    """The embedder (`classifier=False`) or the cross-encoder with one relevance logit."""
    stamp = _stamp(BERT, CORPUS, seed, classifier)
    if _fresh(out / "hetforge-build.json", stamp):
        return out
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertModel

    out.mkdir(parents=True, exist_ok=True)
    tok = tokenizer(out)
    config = BertConfig(vocab_size=len(tok), pad_token_id=tok.pad_token_id, num_labels=1, **BERT)
    torch.manual_seed(seed)
    model = (BertForSequenceClassification if classifier else BertModel)(config).eval()
    model.save_pretrained(out, safe_serialization=True)
    (out / "hetforge-build.json").write_text(json.dumps({"stamp": stamp, "seed": seed, **BERT}, indent=1))
    return out


def intent_weights(out: Path, seed: int) -> Path:
    """The intent head's state_dict as safetensors, from the module file the example serves."""
    source = REPO / "examples" / "models" / "team_intent.py"
    path, stamp_file = out / "team_intent.safetensors", out / "team_intent.build.json"
    stamp = _stamp(INTENT, seed, hashlib.sha256(source.read_bytes()).hexdigest())
    if path.is_file() and _fresh(stamp_file, stamp):
        return path
    import torch
    from safetensors.torch import save_file

    spec = importlib.util.spec_from_file_location("team_intent", source)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch.manual_seed(seed)
    model = module.IntentHead(**INTENT)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    stamp_file.write_text(json.dumps({"stamp": stamp, "seed": seed, **INTENT}, indent=1))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "examples" / "models")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    print(bert(args.out / "tiny-embedder", args.seed, classifier=False))
    print(bert(args.out / "tiny-cross-encoder", args.seed + 1, classifier=True))
    print(intent_weights(args.out, args.seed))


if __name__ == "__main__":
    main()
