"""Weight conversion for Kimi Linear checkpoints (installed as `kimi_linear_conversion`)."""
