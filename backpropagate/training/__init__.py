"""The training engine.

Entry point for every caller (the worker, `backprop train`, `Trainer`)::

    run_training(config: RunConfig, run_dir: Path, emit: Callable[[EventBase], None],
                 control: RunControl | None = None) -> TrainResult

It loads data and model, trains, checkpoints into ``run_dir/checkpoints/``, writes the adapter
to ``run_dir/adapter/`` (or ``config.output_dir``), resumes automatically from the last good
checkpoint found in ``run_dir``, and reports everything as events through ``emit``.
"""
