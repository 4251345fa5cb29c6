"""The command line: ``traintel`` (train, config, report, sinks) and ``traintel-torchrun``."""
