"""FSDP2 for BitNet students: per-block sharding, full-state-dict saving, the ternary all-gather."""
