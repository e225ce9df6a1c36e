"""cnnjax: a JAX functional research framework for convolutional neural networks.

What an experiment script needs is here: the config, the whole training job and its stages,
callbacks, evaluating and predicting with a finished run, sweeping seeds and values, searching
over configurations, visualizing, and a plotting helper. The subpackages follow the data's path and
import only down it: `cnnjax.data` -> `cnnjax.nn` -> `cnnjax.training` -> `cnnjax.search` /
`cnnjax.visualize`, with `cnnjax.report` (logs and plots) beneath them all and `cnnjax.lab` (the
teaching code) aside.

Names are imported lazily so that `cnnjax --help` and config handling do not pay for importing JAX.
"""

import importlib

_EXPORTS = {
    # configuration
    **dict.fromkeys(("Config", "DataConfig", "ModelConfig", "AugmentConfig", "OptimConfig",
                     "TrainConfig", "TransferConfig"), "cnnjax.config"),
    # training: the whole job, its stages and what they return
    **dict.fromkeys(("train_and_evaluate", "setup", "start", "train_epoch", "end_epoch", "finish",
                     "close_epoch", "RunSetup", "RunResult", "StepLog"), "cnnjax.training.loop"),
    **dict.fromkeys(("LoopState", "Best", "Timing"), "cnnjax.training.loop_state"),
    # the one way to build a run's model, optimizer, state and steps
    **dict.fromkeys(("build", "RunParts", "seed_keys", "evaluate"), "cnnjax.training.builder"),
    # callbacks
    **dict.fromkeys(("Callback", "CallbackError", "CallbackList", "Control", "Event", "StepEvent", "LogEvent",
                     "EpochEvent", "EndEvent", "Periodic", "StopAtStep", "CheckpointEvery",
                     "MetricsLog", "TimingLog", "TensorBoard", "ProgressBar", "AugmentationGrid",
                     "DeadFilterCount", "default_callbacks"),
                    "cnnjax.training.callbacks"),
    # steps and the optimizer, for scripts that write their own loop
    **dict.fromkeys(("TrainState", "StepOptions", "create_train_state", "make_train_step",
                     "make_eval_step", "inference_state"), "cnnjax.training.steps"),
    **dict.fromkeys(("make_optimizer", "make_plateau", "register_optimizer", "register_schedule"),
                    "cnnjax.training.optim"),
    "register_augmentation": "cnnjax.data.augment",
    "is_due": "cnnjax.training.periodic",
    # models and data
    **dict.fromkeys(("build_model", "check_model", "register_model", "SeedCNN", "count_params"),
                    "cnnjax.nn.models"),
    **dict.fromkeys(("register_loss", "cross_entropy"), "cnnjax.training.losses"),
    "register_dataset": "cnnjax.data.sources",
    "DatasetSpec": "cnnjax.data.datasets",
    **dict.fromkeys(("load_data", "open_data", "dataset_spec", "load_split", "steps_per_epoch",
                     "train_batches", "eval_batches"), "cnnjax.data.input_pipeline"),
    "normalize": "cnnjax.data.pixels",
    # finished runs, seeds, pictures
    **dict.fromkeys(("Run", "load_run", "load_config"), "cnnjax.training.runs"),
    "DamagedCheckpoint": "cnnjax.training.checkpoint",
    "RunDirInUse": "cnnjax.training.rundir",
    **dict.fromkeys(("run_sweep", "resume_sweep"), "cnnjax.training.sweep"),
    **dict.fromkeys(("run_search", "register_space"), "cnnjax.search"),
    "visualize_run": "cnnjax.visualize",
    **dict.fromkeys(("new_figure", "save_figure", "plot_run"), "cnnjax.report.plots"),
    **dict.fromkeys(("read_jsonl", "write_json"), "cnnjax.report.logs"),
    # many runs: combined into one model, compared on one page
    **dict.fromkeys(("Ensemble", "load_ensemble"), "cnnjax.training.ensemble"),
    "compare_runs": "cnnjax.compare",
}
__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'cnnjax' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
