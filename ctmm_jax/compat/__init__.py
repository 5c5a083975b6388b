"""The original CTMM's function API (`ctmm.op`, `ctmm.ctp`, `ctmm.util`) on ctmm_jax.

Migrating is one import change::

    from ctmm import op, ctp, util              # before
    from ctmm_jax.compat import op, ctp, util   # after

    free, p_wald = ctp.free_REML(y_f="CTP.gz", P_f="P.gz", ctnu_f="ctnu.gz")
    hom, _ = ctp.hom_REML(y_f="CTP.gz", P_f="P.gz", ctnu_f="ctnu.gz")
    p_lrt = util.lrt(free["l"], hom["l"], 4)

`op.<model>_<method>` and `ctp.<model>_<method>` (model hom/iid/free/full, method ML/REML/HE)
keep the original's argument names and order and return its dicts with its keys and shapes;
each fits one gene with `ctmm_jax.fit`. Arguments that only steered the original's optimizer
(`par`, `method`, `nrep`, `optim_by_R`) are accepted and ignored. See `compat.ctp` for the
other differences (the `opt` dict, the `2 pi` constant in `l`). For many genes, call
`ctmm_jax.fit` on a table of genes instead: it fits them all in one batched call.
"""

from . import ctp as ctp
from . import op as op
from . import util as util
