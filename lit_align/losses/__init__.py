"""Pure loss math (no Lightning, no I/O): dpo, grpo, reward, probe."""
