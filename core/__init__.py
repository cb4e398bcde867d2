"""Shared core of the CIFAR-10 toolkit: data, augmentation, models, schedules and the training engine."""
