"""What an app team does with an unpacked text release: ExecuTorch's own TextLLMRunner, the
bundle's tokenizer, a 100-token prompt, generation to the context limit (only executorch and
torch installed). From the unpacked folder: ``python run_bundle.py qwen3-tiny-xnnpack-8da4w.pte``."""
import sys

import executorch.extension.llm.custom_ops.custom_ops  # noqa: F401  llama::update_cache, custom_sdpa
import executorch.kernels.quantized  # noqa: F401  quantized_decomposed::embedding_byte
from executorch.extension.llm.runner import GenerationConfig, TextLLMRunner
from pytorch_tokenizers import get_tokenizer

pte = sys.argv[1]
tok = get_tokenizer("tokenizer.json")
text = ("The quick brown fox jumps over the lazy dog while the river runs to the sea and "
        "the wind moves the grass on the hills near the old town by the water. ") * 6
prompt = tok.decode(tok.encode(text, bos=False, eos=False)[:100])
print(f"prompt: {len(tok.encode(prompt, bos=False, eos=False))} tokens: {prompt[:60]!r}...")
pieces = []
runner = TextLLMRunner(pte, "tokenizer.json")
runner.generate(prompt, GenerationConfig(temperature=0.0, max_new_tokens=-1, echo=False),
                token_callback=pieces.append)
print(f"{pte}: {len(pieces)} new tokens: {''.join(pieces)[:160]!r}")
