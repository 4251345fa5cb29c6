"""JSON lines: the stdout sink, the strict line renderer (the diagnostic file renders with it too),
stdout capture and the stdlib logging route."""
