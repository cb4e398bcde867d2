"""Data: reading CIFAR-10 wherever it is, the uint8 cache, image subsets, the device loader and the batched augmentation ops."""
