"""Tokenizers that travel with artifacts: which files they are, a generated tokenizer for
synthetic models, and the checks a bundle's tokenizer must pass.

A runner loads a tokenizer folder (``tokenizer.json`` with ``tokenizer_config.json`` beside
it: ExecuTorch's C++ HFTokenizer reads BOS/EOS from the latter) or a single
``tokenizer.model`` (SentencePiece / tiktoken). The files below are the ones a Hugging Face
checkpoint keeps for its tokenizer and processor; they are inputs of the tokenizer step,
hashed by content, and copied unchanged.

Synthetic models get a byte-level BPE tokenizer trained with the ``tokenizers`` library on
the text shipped in ``mlxbuild/data/corpus.txt``, with exactly the model's vocabulary:
the config's special ids hold special tokens, every other id a learned token or a reserved
``<|unused_N|>`` one, so any id the model emits decodes. Its alphabet is printable ASCII,
so every token decodes to text on its own (a runner's per-token callback can be compared
token for token).

Planning imports this module: torch-free, and ``tokenizers`` only inside functions.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

# What travels, relative to a checkpoint folder (the names transformers writes for a
# tokenizer and a processor).
FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
         "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
         "preprocessor_config.json", "processor_config.json")
# What the generated tokenizer of a synthetic model is written as.
SYNTHETIC_FILES = ("tokenizer.json", "tokenizer_config.json")
# Files a runner can load as the tokenizer proper (one is enough).
LOADABLE = ("tokenizer.json", "tokenizer.model")
CORPUS = Path(__file__).parent / "data" / "corpus.txt"
# The round trip of a bundle's check: a sentence any text tokenizer must give back unchanged.
SAMPLE = "The runner reads the tokenizer beside the program, 42 times."
_ALPHABET = [c for c in string.printable if c not in "\t\r\x0b\x0c"]


def corpus() -> str:
    return CORPUS.read_text()


def files_in(folder: Path) -> list[Path]:
    """The tokenizer and processor files of a checkpoint folder (empty when it has none a
    runner could load)."""
    found = [folder / name for name in FILES if (folder / name).is_file()]
    return found if any(p.name in LOADABLE for p in found) else []


def synthetic_spec(config: dict) -> dict | None:
    """What decides a synthetic model's generated tokenizer: its vocabulary size and the
    ids its config reserves (``*_token_id``); None when the vocabulary cannot hold the
    corpus's characters and the special ids. A composite model's vocabulary is its text
    config's (with the composite's own ids: Voxtral's audio placeholder)."""
    if "vocab_size" not in config and isinstance(config.get("text_config"), dict):
        config = {**config["text_config"], **{k: v for k, v in config.items() if k.endswith("token_id")}}
    vocab = config.get("vocab_size")
    if not isinstance(vocab, int):
        return None
    special: dict[int, str] = {}
    for key in sorted(config):
        if not key.endswith("token_id"):
            continue
        ids = config[key] if isinstance(config[key], list) else [config[key]]
        role = key.removesuffix("_token_id")
        for n, i in enumerate(ids):
            if isinstance(i, int) and 0 <= i < vocab and i not in special:
                special[i] = f"<|{role}|>" if n == 0 else f"<|{role}_{n}|>"
    needed = len(set(corpus()) | set(SAMPLE)) + len(special)
    if vocab < needed:
        return None
    return {"vocab_size": vocab, "special": {str(i): name for i, name in sorted(special.items())}}


def write_synthetic(spec: dict, out: Path) -> list[str]:
    """Train the generated tokenizer for ``spec`` into ``out``; returns the files written.
    Training is single-input and deterministic: the same spec gives the same bytes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    vocab_size = spec["vocab_size"]
    special = {int(i): name for i, name in spec["special"].items()}
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    alphabet = [byte_level.pre_tokenize_str(c)[0][0] for c in _ALPHABET]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(special), show_progress=False,
                                  initial_alphabet=alphabet, limit_alphabet=len(alphabet))
    learner = Tokenizer(models.BPE())
    learner.pre_tokenizer = byte_level
    learner.train_from_iterator([corpus()], trainer)
    learned = json.loads(learner.to_str())["model"]
    ordered = sorted(learned["vocab"], key=learned["vocab"].get)

    # Special ids are fixed by the model; learned tokens fill the other ids in learned order.
    free = (i for i in range(vocab_size) if i not in special)
    vocab = dict(zip(ordered, free))
    unused = {i: f"<|unused_{i}|>" for i in free}
    added = {**special, **unused}
    # The added tokens are in the model's vocabulary too: the tokenizers library gives an
    # added token missing from it the next free id, whatever id the file says (the C++
    # loader of the runners reads the file's ids), and the two must agree.
    vocab.update({name: i for i, name in added.items()})
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[tuple(m.split(" ")) if isinstance(m, str)
                                                          else tuple(m) for m in learned["merges"]]))
    tokenizer.pre_tokenizer = byte_level
    tokenizer.decoder = decoders.ByteLevel()
    data = json.loads(tokenizer.to_str())
    data["added_tokens"] = [{"id": i, "content": name, "single_word": False, "lstrip": False,
                             "rstrip": False, "normalized": False, "special": True}
                            for i, name in sorted(added.items())]
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False, indent=1, sort_keys=True))
    roles = {name.strip("<|>"): name for name in special.values()}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": vocab_size,
              **{f"{role}_token": roles[role] for role in ("bos", "eos", "pad", "unk") if role in roles}}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=1, sort_keys=True))
    return list(SYNTHETIC_FILES)


def _cpp(folder: Path):
    """The tokenizer as ExecuTorch's runners load it (pytorch_tokenizers: the same C++)."""
    if (folder / "tokenizer.json").is_file():
        from pytorch_tokenizers import CppHFTokenizer

        tok = CppHFTokenizer()
        tok.load(str(folder))
        return tok
    from pytorch_tokenizers import CppSPTokenizer, CppTiktoken

    for cls in (CppSPTokenizer, CppTiktoken):
        tok = cls()
        try:
            tok.load(str(folder / "tokenizer.model"))
            return tok
        except Exception:  # the bindings raise RuntimeError with the C++ error; try the next format
            continue
    raise ValueError(f"{folder}: no tokenizer a runner loads (tokenizer.json or tokenizer.model)")


def runner_prompt(folder: Path, n_tokens: int) -> tuple[str, list[int]]:
    """A prompt text of about ``n_tokens`` tokens (at most that many) and its ids as the
    runner's tokenizer encodes it without BOS/EOS (GenerationConfig's num_bos=0)."""
    tok = _cpp(folder)
    text = corpus()
    while len(tok.encode(text, 0, 0)) < n_tokens:
        text += "\n" + corpus()
    ids = tok.encode(text, 0, 0)[:n_tokens]
    # Decoding a cut and encoding again can merge differently at the cut: encode what is sent.
    prompt = "".join(tok.decode(i) for i in ids)
    ids = tok.encode(prompt, 0, 0)
    while len(ids) > n_tokens:
        prompt = prompt[:-1]
        ids = tok.encode(prompt, 0, 0)
    return prompt, ids


def pieces(folder: Path, ids: list[int]) -> list[str]:
    """What a runner's token callback receives for each id."""
    tok = _cpp(folder)
    return [tok.decode(i) for i in ids]


def check(folder: Path, constant_methods: dict) -> list[str]:
    """Problems of a bundle's tokenizer, one line each: it loads as the runner loads it,
    round-trips a sample text, its ids fit the program's vocabulary, and its BOS/EOS ids
    agree with the program's constant methods."""
    try:
        tok = _cpp(folder)
    except Exception as e:  # noqa: BLE001  the C++ loader's error, whatever its type
        return [f"{folder}: does not load as the runner loads it ({e})"]
    problems = []
    ids = tok.encode(SAMPLE, 0, 0)
    back = "".join(tok.decode(i) for i in ids)
    if back.strip() != SAMPLE.strip():
        problems.append(f"{folder}: {SAMPLE!r} comes back as {back!r}")
    vocab = constant_methods.get("get_vocab_size")
    if vocab is not None:
        if tok.vocab_size() > vocab:
            problems.append(f"{folder}: {tok.vocab_size()} tokens, the program's vocabulary has {vocab}")
        if ids and max(ids) >= vocab:
            problems.append(f"{folder}: encodes to id {max(ids)}, outside the program's vocabulary of {vocab}")
    eos = constant_methods.get("get_eos_ids")
    if eos is not None and tok.eos_tok() not in eos:
        problems.append(f"{folder}: EOS id {tok.eos_tok()}, the program's get_eos_ids is {eos}")
    bos = constant_methods.get("get_bos_id")
    if bos is not None and tok.bos_tok() != bos:
        problems.append(f"{folder}: BOS id {tok.bos_tok()}, the program's get_bos_id is {bos}")
    return problems


def encode_text(folder: Path, text: str) -> list[int]:
    """``text`` as the runner's tokenizer encodes it, without BOS/EOS."""
    return list(_cpp(folder).encode(text, 0, 0))
