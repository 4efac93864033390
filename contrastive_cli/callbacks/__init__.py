"""Callbacks of the training loop, one behaviour per module (see ``contrastive_cli.events``):
``monitor`` (k-NN during training), ``budget`` (trainer.time_budget), ``progress`` (the bar
and the epoch line), ``metrics_file`` (metrics.jsonl), ``trackers`` (MLflow, TensorBoard),
``checkpointing`` (checkpoints/last.pt), ``signals`` (a clean stop on SIGINT/SIGTERM),
``divergence`` (results.json of a diverged run). ``contrastive_cli.run`` puts them in order."""
