"""cosmos_train: post-training for NVIDIA Cosmos 3 world models."""

__version__ = "0.1.0"
