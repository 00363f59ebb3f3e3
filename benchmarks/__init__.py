"""Speed benchmarks of rfim_jax against its peers (SPEC §6): ``python -m benchmarks.speed``."""
