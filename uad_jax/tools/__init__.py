"""Command-line tools (`python -m uad_jax.tools.<name>`)."""
