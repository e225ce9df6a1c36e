"""Data: TFDS builders (`datasets`), the host-side input pipeline (`input_pipeline`) and on-device
augmentation keyed per example (`augment`). Imports nothing of cnnjax but the config."""
