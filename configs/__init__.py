"""ml_collections configs: `python -m dcae_jax.main --config=configs/<file>.py:<args>`."""
