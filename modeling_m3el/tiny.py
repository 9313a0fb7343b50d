"""Tiny M3EL pieces built from code alone (no Hub access): a CLIP-style tokenizer, processor and model config.

Used by the tests and the built-in demo; the real recipe loads `openai/clip-vit-base-patch32` instead.
"""

from transformers import CLIPImageProcessorPil, CLIPTokenizer

from .configuration_m3el import M3ELConfig
from .processing_m3el import M3ELProcessor

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _byte_alphabet() -> list[str]:
    """The 256 printable characters byte-level BPE uses for the bytes 0..255 (GPT-2's table)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + extra)
            extra += 1
    return [table[byte] for byte in range(256)]


def tiny_tokenizer(words: tuple[str, ...] = ()) -> CLIPTokenizer:
    """
    A CLIP tokenizer over single bytes, plus one token for each of `words` (lower-case ASCII letters).
    Every text tokenizes; the listed words take one token each, so short texts fit in a few tokens.
    """
    alphabet = _byte_alphabet()
    for word in set(words):
        if not word.isascii() or not word.isalpha() or not word.islower() or len(word) < 2:
            raise ValueError(f"tiny_tokenizer words must be lower-case ASCII letters, got {word!r}")
    merges = _bpe_merges(sorted(set(words)))
    vocab = {}
    for token in alphabet + [char + "</w>" for char in alphabet] + [left + right for left, right in merges] + [BOS, EOS]:
        vocab.setdefault(token, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges)


def _bpe_merges(words: list[str]) -> list[tuple[str, str]]:
    """
    BPE training on `words` until each is one piece. Encoding replays the merges in this order, so every listed word
    becomes one token; chaining each word's merges on its own does not, as other words' earlier merges split it
    ("purple" after "planet" ends as pur/pl/e).
    """
    pieces = [list(word[:-1]) + [word[-1] + "</w>"] for word in words]
    merges = []
    while True:
        counts = {}
        for word in pieces:
            for pair in zip(word, word[1:]):
                counts[pair] = counts.get(pair, 0) + 1
        if not counts:
            return merges
        best = max(counts, key=counts.get)  # ties: the first pair met
        merges.append(best)
        for index, word in enumerate(pieces):
            merged, position = [], 0
            while position < len(word):
                if position + 1 < len(word) and (word[position], word[position + 1]) == best:
                    merged.append(word[position] + word[position + 1])
                    position += 2
                else:
                    merged.append(word[position])
                    position += 1
            pieces[index] = merged


def tiny_clip_config(tokenizer: CLIPTokenizer, image_size: int = 32, patch_size: int = 8, hidden: int = 32) -> dict:
    """A 2-layer CLIP config sized for tests and the CPU demo; text width equals projection width (bidirectional)."""
    return {
        "projection_dim": hidden,
        "text_config": {
            "vocab_size": len(tokenizer),
            "hidden_size": hidden,
            "intermediate_size": 2 * hidden,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "max_position_embeddings": 77,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        "vision_config": {
            "hidden_size": hidden + 16,  # differs from the text width, as in ViT-B/32 (768 vs 512)
            "intermediate_size": 2 * hidden,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": image_size,
            "patch_size": patch_size,
        },
    }


def tiny_image_processor(image_size: int = 32) -> CLIPImageProcessorPil:
    return CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )


def tiny_processor(words: tuple[str, ...] = (), image_size: int = 32, text_max_length: int = 40) -> M3ELProcessor:
    return M3ELProcessor(tiny_image_processor(image_size), tiny_tokenizer(words), text_max_length=text_max_length)


def tiny_config(processor: M3ELProcessor, matching_dim: int = 16, **overrides) -> M3ELConfig:
    """An M3EL config for a tiny CLIP that matches `processor` (vocabulary, image size, text length)."""
    image_size = processor.image_size[0]
    return M3ELConfig(
        clip_config=tiny_clip_config(processor.tokenizer, image_size=image_size),
        matching_dim=matching_dim,
        text_max_length=processor.text_max_length,
        text_separator=processor.text_separator,
        **overrides,
    )
