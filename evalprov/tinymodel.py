"""Build a tiny random Llama model and tokenizer locally, with no download from any hub.

The model is what the end-to-end tests serve with real vLLM on the CPU: a byte-level BPE
tokenizer (vocab 1024) trained on generated text, wrapped in ``PreTrainedTokenizerFast`` with a
chat template (so ``/v1/chat/completions`` works), and a randomly initialised
``LlamaForCausalLM`` (hidden 64, 2 layers, 2 heads of dim 32, intermediate 128). A fixed seed makes
the files, and so the server's greedy output, deterministic.

Usage (inside a Python that has torch, transformers and tokenizers, e.g. the vLLM venv)::

    python -m evalprov.tinymodel DEST [--seed N] [--force]

torch/transformers/tokenizers are imported lazily: this module itself imports with the standard
library only, so evalprov's own environment can import it (and test the completeness check).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

# Shape of the model. head_dim = HIDDEN // HEADS must be >= 32: with 16 vLLM's CPU attention
# starts and reports healthy, then every generation fails.
VOCAB_SIZE = 1024
HIDDEN = 64
LAYERS = 2
HEADS = 2
INTERMEDIATE = 128
MAX_POSITIONS = 2048

BOS = "<|begin_of_text|>"
EOS = "<|end_of_text|>"
PAD = "<|pad|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = [BOS, EOS, PAD, IM_START, IM_END]

# ChatML-style; the generation prompt opens an assistant turn.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

MARKER = "evalprov-tinymodel.json"
# Files that must exist (non-empty) for DEST to count as a complete model. The marker is written
# last, and the whole directory is renamed into place, so its presence means the rest is there.
REQUIRED_FILES = (
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    MARKER,
)

_WORD_TEXT = (
    "the a an of to in is and that it for on with as was by at be this from or are not "
    "model server token answer question evaluation provision host fleet node task score "
    "what which who where when why how yes no true false number one two three four five six "
    "seven eight nine ten hundred thousand first second last next before after because if "
    "then else while until small large fast slow red green blue light dark open close start "
    "stop run test pass fail check read write send receive user assistant system hello world "
    "please thank you can could would should must may might will shall do does did have has "
    "had make made take took give gave see saw know knew think thought say said tell told"
)


def _corpus(seed: int, sentences: int = 6000) -> list[str]:
    """Deterministic generated training text: words, numbers, punctuation, chat turns."""
    rng = random.Random(seed)  # noqa: S311 - reproducible text, not security
    vocab = _WORD_TEXT.split()
    letters = "abcdefghijklmnopqrstuvwxyz"
    syllables = [c + v for c in "bcdfghklmnprstvwz" for v in "aeiou"]
    lines: list[str] = []
    for i in range(sentences):
        words = []
        for _ in range(rng.randint(4, 16)):
            r = rng.random()
            if r < 0.6:
                words.append(rng.choice(vocab))
            elif r < 0.8:
                words.append("".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))))
            elif r < 0.9:
                words.append(str(rng.randint(0, 10_000)))
            else:
                words.append("".join(rng.choice(letters) for _ in range(rng.randint(1, 8))))
        sentence = " ".join(words)
        sentence = sentence[0].upper() + sentence[1:] + rng.choice([".", "?", "!", ",", ":"])
        if i % 5 == 0:
            role = rng.choice(["user", "assistant", "system"])
            sentence = f"{IM_START}{role}\n{sentence}{IM_END}\n"
        lines.append(sentence)
    return lines


def is_complete(dest: Path) -> bool:
    """True when ``dest`` holds a complete tiny model written by :func:`build_tiny_model`."""
    dest = Path(dest)
    for name in REQUIRED_FILES:
        path = dest / name
        if not path.is_file() or path.stat().st_size == 0:
            return False
    try:
        config = json.loads((dest / "config.json").read_text())
        marker = json.loads((dest / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return (
        isinstance(config, dict)
        and config.get("model_type") == "llama"
        and isinstance(marker, dict)
        and marker.get("complete") is True
    )


def _train_tokenizer(seed: int, out: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(seed), trainer=trainer)
    if tok.get_vocab_size() != VOCAB_SIZE:
        raise RuntimeError(f"tokenizer has {tok.get_vocab_size()} tokens, wanted {VOCAB_SIZE}")
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=[IM_START, IM_END],
        model_max_length=MAX_POSITIONS,
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out))
    return fast


def _build_model(seed: int, tokenizer, out: Path) -> None:
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS,
        head_dim=HIDDEN // HEADS,
        max_position_embeddings=MAX_POSITIONS,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.convert_tokens_to_ids(BOS),
        eos_token_id=tokenizer.convert_tokens_to_ids(EOS),
        pad_token_id=tokenizer.convert_tokens_to_ids(PAD),
        torch_dtype="float32",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=[config.eos_token_id, tokenizer.convert_tokens_to_ids(IM_END)],
        pad_token_id=config.pad_token_id,
    )
    model.save_pretrained(str(out), safe_serialization=True)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def build_tiny_model(dest: Path, seed: int = 0) -> Path:
    """Write the tiny model + tokenizer to ``dest`` (atomically) and return ``dest``.

    Builds in a sibling temporary directory and renames it into place, so an interrupted build
    never leaves a half-written ``dest``. ``dest`` must not exist, or be an empty directory.
    """
    dest = Path(dest).absolute()
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise FileExistsError(f"{dest} exists and is not empty")
    dest.parent.mkdir(parents=True, exist_ok=True)
    # Leftovers of interrupted builds of the same DEST.
    for stale in dest.parent.glob(f".{dest.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        t0 = time.monotonic()
        tokenizer = _train_tokenizer(seed, tmp)
        print(f"tinymodel: tokenizer trained (vocab {len(tokenizer)}) in "
              f"{time.monotonic() - t0:.1f} s", flush=True)
        t1 = time.monotonic()
        _build_model(seed, tokenizer, tmp)
        print(f"tinymodel: model saved in {time.monotonic() - t1:.1f} s", flush=True)
        marker = {
            "complete": True,
            "seed": seed,
            "vocab_size": VOCAB_SIZE,
            "hidden_size": HIDDEN,
            "num_hidden_layers": LAYERS,
            "num_attention_heads": HEADS,
            "intermediate_size": INTERMEDIATE,
            "max_position_embeddings": MAX_POSITIONS,
            "model_sha256": _sha256(tmp / "model.safetensors"),
        }
        (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        tmp.chmod(0o755)
        if dest.exists():
            dest.rmdir()  # empty, checked above
        tmp.rename(dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m evalprov.tinymodel",
        description="Build a tiny random Llama model + tokenizer (no hub) into DEST.",
    )
    p.add_argument("dest", type=Path, help="directory to write the model to")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument(
        "--force", action="store_true", help="rebuild even if DEST already holds a complete model"
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    dest: Path = args.dest.absolute()
    if is_complete(dest) and not args.force:
        print(f"tinymodel: {dest} already holds a complete model; nothing to do")
        return 0
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        if not args.force:
            print(
                f"tinymodel: {dest} exists but is not a complete tiny model; remove it or pass "
                "--force",
                file=sys.stderr,
            )
            return 2
        if dest.is_dir():
            shutil.rmtree(dest)
        else:
            dest.unlink()
    t0 = time.monotonic()
    print(f"tinymodel: building into {dest} (seed {args.seed})", flush=True)
    build_tiny_model(dest, seed=args.seed)
    size = sum(p.stat().st_size for p in dest.iterdir() if p.is_file())
    print(f"tinymodel: done in {time.monotonic() - t0:.1f} s ({size / 1e6:.1f} MB) -> {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
