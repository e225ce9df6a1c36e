"""The run directory: its default name, creating it, and checking that a run can be resumed.

A run directory holds config.json, metrics.jsonl, timing.jsonl, summary.json, ckpt/ and plots;
it is created by the first (primary) process only.
"""

from __future__ import annotations

import datetime
import json
import pathlib

from cnnjax.config import Config
from cnnjax.training import checkpoint

DEFAULT_ROOT = pathlib.Path("checkpoints")


def default_run_dir(cfg: Config, root: pathlib.Path = DEFAULT_ROOT) -> pathlib.Path:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return root / f"{cfg.data.dataset}-{cfg.model.name}-s{cfg.train.seed}-{stamp}"


# Fields that change how a run is displayed, not what it computes: a resumed run may differ in them.
DISPLAY_ONLY = {"train.progress"}


def config_differences(saved: Config, wanted: Config) -> list[str]:
    """'section.field: saved -> wanted' for every field that differs, display-only ones aside."""
    diffs = []
    for section, fields in wanted.to_dict().items():
        for name, value in fields.items():
            key, old = f"{section}.{name}", saved.to_dict()[section][name]
            if old != value and key not in DISPLAY_ONLY:
                diffs.append(f"{key}: {old!r} -> {value!r}")
    return diffs


def open_run_dir(run_dir: pathlib.Path, cfg: Config, primary: bool = True) -> bool:
    """Creates the run directory or checks it can be resumed with `cfg`; True when resuming.

    Only the primary process creates files; the others only read what is already there.
    """
    if (run_dir / "summary.json").exists():
        raise FileExistsError(f"run directory {run_dir} already holds a finished run; choose another "
                              f"--run-dir or delete it.")
    saved_path = run_dir / "config.json"
    has_checkpoint = (run_dir / checkpoint.CKPT_DIR).is_dir() and any(
        p.name.isdigit() for p in (run_dir / checkpoint.CKPT_DIR).iterdir())
    if not has_checkpoint:
        if not primary:
            return False
        if (run_dir / "metrics.jsonl").exists():
            raise FileExistsError(f"run directory {run_dir} holds a run with no checkpoint to resume "
                                  f"from; choose another --run-dir or delete it.")
        run_dir.mkdir(parents=True, exist_ok=True)
        saved_path.write_text(cfg.to_json() + "\n", encoding="utf-8")
        return False
    diffs = config_differences(Config.from_dict(json.loads(saved_path.read_text())), cfg)
    if diffs:
        raise ValueError(f"refusing to resume {run_dir} with a different config:\n  "
                         + "\n  ".join(diffs) + "\nResume with the run's own config "
                         f"(cnnjax train --resume {run_dir}) or train into a new --run-dir.")
    return True
