"""Online machinery: sampling answers (generation, backends, rollouts), scoring them (reward
functions) and logging them (sample tables). Used by the online algorithms (PPO, GRPO)."""
