"""A run's folder and what lasts of it: atomic writes, the lock, checkpoints, resume."""
