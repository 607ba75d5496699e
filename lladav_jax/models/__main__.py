"""Prints a model variant's parameter counts, built abstractly (no memory).

    python -m lladav_jax.models 8b
"""

import sys

from lladav_jax.models import lladav, variants


def main(argv: list[str]) -> None:
    names = argv or list(variants.VARIANTS)
    for name in names:
        counts = lladav.param_counts(variants.model_config(name))
        parts = ", ".join(f"{k} {v:,}" for k, v in counts.items())
        print(f"{name}: {parts}")


if __name__ == "__main__":
    main(sys.argv[1:])
