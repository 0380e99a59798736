"""Data: image sources, splits, host batches and on-device augmentation."""
