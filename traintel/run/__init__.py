"""A run: its plan (engines, handlers, sinks built from the config and the task), its session (the
resources it holds while it trains), its run directory (layout, checkpoints, attempts), signals and
torch.distributed."""
