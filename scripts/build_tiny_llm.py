"""Build the examples' tiny LLM offline: a 2-layer Llama with random weights and a locally trained tokenizer.

Nothing can be downloaded on these machines, so the LLM stages of the examples and tests use this
model. It is not meant to say anything useful: it exercises vLLM's engine, batching, streaming,
chat templates and constrained decoding for real, on the CPU, in seconds.

    python scripts/build_tiny_llm.py [--out examples/models/tiny-llm] [--seed 0]

- Weights: `LlamaForCausalLM` with hidden size 64, 2 layers, 2 heads (head_dim 32, a size vLLM's
  CPU attention supports; 16 is not), initialized under a fixed seed, saved as safetensors.
- Tokenizer: byte-level BPE (the `tokenizers` library) trained on this repository's example and
  package sources, 4096 tokens, with chat special tokens and a chat template in
  `tokenizer_config.json` (vLLM's chat path needs one).
The build is skipped when the folder already holds a model built with the same settings.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SPECIALS = ["<|pad|>", "<|bos|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>", "<|tool|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
SETTINGS = {
    "vocab_size": 4096,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "max_position_embeddings": 1024,
}


def training_text() -> list[str]:
    """Sorted, fixed set of local files: the same checkout always trains the same tokenizer."""
    files = sorted([*REPO.glob("examples/**/*.py"), *REPO.glob("examples/*.yaml"), *REPO.glob("hetforge/**/*.py")])
    return [f.read_text(encoding="utf-8") for f in files]


def build(out: Path, seed: int) -> Path:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    texts = training_text()
    stamp = hashlib.sha256(
        json.dumps([SETTINGS, seed, CHAT_TEMPLATE, [hashlib.sha256(t.encode()).hexdigest() for t in texts]]).encode()
    ).hexdigest()[:16]
    if (out / "hetforge-build.json").exists() and json.loads((out / "hetforge-build.json").read_text()).get(
        "stamp"
    ) == stamp:
        return out
    out.mkdir(parents=True, exist_ok=True)

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=SETTINGS["vocab_size"],
        special_tokens=SPECIALS,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|end|>", pad_token="<|pad|>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)

    torch.manual_seed(seed)
    config = LlamaConfig(
        **{**SETTINGS, "vocab_size": len(fast)},
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
        tie_word_embeddings=True,
        torch_dtype="float32",
    )
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(out, safe_serialization=True)
    (out / "hetforge-build.json").write_text(json.dumps({"stamp": stamp, "seed": seed, **SETTINGS}, indent=1))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "examples" / "models" / "tiny-llm")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(build(args.out, args.seed))


if __name__ == "__main__":
    main()
