"""Built-in tasks that need no downloads."""
