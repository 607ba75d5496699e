"""A model variant on its own: `tiny` (tests), `small` (CPU benchmarks), `8b` (official shapes).

    python -m lladav_jax.models 8b      # parameter counts of a variant
    # in other configs: from configs import model; config.model = model.get_config("8b")
"""

from lladav_jax.models.variants import model_config


def get_config(arg: str = "tiny"):
    return model_config(arg)
