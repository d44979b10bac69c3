"""The evaluation sequences quality is measured on (``mlxbuild.stages.baseline``): a
dataset's text as the runner's tokenizer encodes it, or seeded ids for a model without a
tokenizer. Its own module, so the tokenizer code it runs is in the keys of the baseline
(and the quality steps after it) only, not in every step of a text model.
"""

from __future__ import annotations

from pathlib import Path

from mlxbuild.errors import BuildError


def tokens(spec: dict, tokenizer_dir: Path | None, vocab_size: int):
    """The evaluation sequences [N, L] and whether they are text: the dataset's text as the
    runner's tokenizer encodes it, cut into N consecutive windows of L tokens (the text
    repeated if it is shorter); without a tokenizer, seeded ids over the vocabulary."""
    import numpy as np

    n, length = spec["sequences"], spec["seq_len"]
    if tokenizer_dir is None:
        rng = np.random.default_rng(spec.get("seed", 0))
        return rng.integers(0, vocab_size, (n, length)).astype(np.int64), False
    from mlxbuild import tokenizer

    try:
        ids = tokenizer.encode_text(tokenizer_dir, read_dataset(spec["dataset"]))
    except ValueError as e:  # the dataset's own problem: one line, naming the file
        raise BuildError(str(e)) from None
    if not ids:
        raise BuildError(f"{spec['dataset'].get('file') or spec['dataset']}: no text to evaluate on")
    while len(ids) < n * length:
        ids = ids + ids
    return np.asarray(ids[:n * length], dtype=np.int64).reshape(n, length), True


def read_dataset(dataset: dict) -> str:
    """The evaluation text of a dataset spec: a .txt file, a .jsonl file's ``text`` fields,
    or a Hugging Face dataset's ``text`` column (through `datasets`, which honours
    HF_DATASETS_OFFLINE)."""
    import json

    if "hf" in dataset:
        try:
            import datasets
        except ImportError:
            raise ValueError(f"quality.dataset hf:{dataset['hf']} needs the `datasets` package "
                             "(pip install datasets)") from None
        rows = datasets.load_dataset(dataset["hf"], split=dataset.get("split") or "test")
        return "\n".join(t for t in rows[dataset.get("column") or "text"] if t)
    path = Path(dataset["file"])
    if path.suffix == ".jsonl":
        texts = []
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    texts.append(json.loads(line)["text"])
                except (ValueError, KeyError, TypeError):
                    raise ValueError(f"{path}:{i}: not a JSON object with a 'text' field") from None
        return "\n".join(texts)
    return path.read_text(encoding="utf-8")
