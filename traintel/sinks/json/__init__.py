"""JSON lines: the stdout sink, the line renderer it shares with the diagnostic file, stdout
capture and the stdlib logging route."""
