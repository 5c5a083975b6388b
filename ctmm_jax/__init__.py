"""ctmm_jax: cell type-specific linear mixed models (CTMM), batched over genes in JAX.

Importing ctmm_jax turns on float64 in JAX (`jax_enable_x64`): the likelihoods and the Wald
tests need it. Set it back with `jax.config.update("jax_enable_x64", False)` only if you know
what you are doing; `fit` refuses to run without it.
"""

import jax

jax.config.update("jax_enable_x64", True)

from .api import fit as fit  # noqa: E402
from .data import CTPData as CTPData  # noqa: E402
from .data import OPData as OPData  # noqa: E402
from .datasets import load_example as load_example  # noqa: E402
from .inference import lrt as lrt  # noqa: E402
from .results import FitResult as FitResult  # noqa: E402
from .simulate import simulate as simulate  # noqa: E402

__version__ = "0.1.0"
