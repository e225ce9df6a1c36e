"""What a run leaves for people: JSON-lines logs (`logs`) and PNG plots (`plots`), written whole
or refused in one line (`disk`). Imports nothing else of cnnjax. TensorBoard event files are
written by `cnnjax.training.callbacks.TensorBoard`."""
