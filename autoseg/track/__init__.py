"""Experiment tracking: every fold run, sweep and train-all in MLflow, TensorBoard or Weights & Biases.

`spec` says which tracker (``--track``, a sweep's ``track:``, ``$AUTOSEG_TRACK``), `base` is the
one protocol every backend implements (`mlflow_backend`, `tensorboard_backend`, `wandb_backend`;
each imports its package only when used), `logger` sends one run's events from a worker thread
so that tracking never slows or stops training, `fold` says what a fold run logs, and `readback`
reads MLflow runs back (``sweep-report --from-tracker``). Stage: above evaluate, below pipeline;
the fold run (`autoseg.pipeline.tracking`) and the scheduler wire it in (docs/tracking.md).
"""
