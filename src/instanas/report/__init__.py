"""What a finished run shows: results.md, report.md and report.html, plots, training
diagnostics and the results.json schema."""
