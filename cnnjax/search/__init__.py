"""Search over configurations with Optuna: `cnnjax search`, `run_search`.

A study is a directory (`<study>/study.json`, `trials/<number>/` run directories, and with no
database the Optuna journal `study.journal`): space.py reads and checks a search space,
storage.py opens where the study lives, pruning.py reports each epoch to the trial, worker.py
runs the trials, batch.py trains K of them as one sweep (`--batch K`), record.py writes study.json
and the table.
"""

from cnnjax.search.space import register_space
from cnnjax.search.worker import run_search, show

__all__ = ["register_space", "run_search", "show"]
