"""Run MLX-delegated .pte files on any host through the `mlx` package."""
