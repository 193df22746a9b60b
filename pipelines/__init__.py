"""Tasks: one module per task (prior, reward, evaluation, prior pretraining)."""
