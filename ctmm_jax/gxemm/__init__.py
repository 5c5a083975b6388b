"""GxEMM (Dahl et al., AJHG 2020): gene-by-environment heritability by native REML or HE.

    from ctmm_jax import gxemm
    out = gxemm.fit(y, X, K, Z, gtype="free", etype="hom")
    gxemm.mvwald_test(out.sig2s[1:3], out.sig2Var[1:3, 1:3])
    out.named_table(levels=["female", "male"])   # sig2g_hom, sig2g_female, ..., p_gxe_wald

See model.py for the kernels, reml.py and he.py for the estimators, stats.py for the tests.
"""

from .api import GxEMMResult as GxEMMResult
from .api import fit as fit
from .api import gxe_tests as gxe_tests
from .model import IdentifiabilityWarning as IdentifiabilityWarning
from .model import kernel_vif as kernel_vif
from .plink import grm as grm
from .plink import read_genotypes as read_genotypes
from .simulation import simulate as simulate
from .stats import h2_equal_test as h2_equal_test
from .stats import lrt as lrt
from .stats import mvwald_test as mvwald_test
from .stats import wald_test as wald_test
