"""lladav-jax: LLaDA-V in JAX/Flax."""
