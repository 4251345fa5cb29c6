"""File and descriptor plumbing the sinks and the run directory share: the background writer,
atomic files, directories made and removed again."""
