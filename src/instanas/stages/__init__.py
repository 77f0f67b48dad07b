"""The stages of a run: the registry (stages/registry.py), one module per stage with
`run(ctx)`, and the helpers they share (the epoch loop, resume, run-directory I/O)."""
