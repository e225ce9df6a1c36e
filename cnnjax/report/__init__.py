"""What a run leaves for people: JSON-lines logs (`logs`), TensorBoard event files
(`tensorboard`) and PNG plots (`plots`). Imports nothing else of cnnjax."""
