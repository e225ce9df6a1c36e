"""Models: output-size arithmetic (`geometry`), pooling and dropout (`layers`), the convolution
(`conv`), SeedCNN and the registry (`models`), ResNets (`resnet`), torch weight conversion
(`convert`), capturing named intermediates (`capture`) and filter statistics (`health`).
Imports only `cnnjax.data` and the config."""
