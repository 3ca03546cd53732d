"""Download and quantize checkpoints into MLX folders."""
