"""`python -m ctmm_jax`: the `ctmm-jax` command line."""

from .cli import run

if __name__ == "__main__":
    run()
