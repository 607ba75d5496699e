"""`python -m lladav_jax.train --config configs/demo.py --workdir DIR [--config.key=value]`."""

from lladav_jax.cli.train import main

if __name__ == "__main__":
    main()
