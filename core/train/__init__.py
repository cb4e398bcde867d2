"""Training: a run built from its flags, the epoch loop, step and evaluation, optimizer, schedules, EMA, the LR range test."""
