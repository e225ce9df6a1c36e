"""Data: datasets by name (`datasets`: the built-ins, on the TFDS machinery of `store`; `mnist`,
`cifar`, `imagefolder`, `tfds_prepared`; a user's arrays in `sources`), the host-side input pipeline
(`input_pipeline`: each kind of dataset read once by its module's `read`, then held in memory by
`memory` or streamed through grain by `stream`, both in the order of `order`)
and on-device augmentation keyed per example (`augment`, `mix`). Imports nothing of cnnjax but the
config and its one-line notices."""
