"""The stages of a run: one module per stage with `run(ctx)` (``registry.py`` maps the stage
names of ``stage_specs.py`` to them), and the helpers they share (the epoch loop, resume,
run-directory I/O, policy fine-tuning, standalone training)."""
