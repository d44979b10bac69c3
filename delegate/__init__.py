"""Backend-specific knowledge: one module per ExecuTorch backend."""
