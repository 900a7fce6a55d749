"""LoRA fine-tuning for Kimi Linear (installed as kimi_linear_finetune)."""
