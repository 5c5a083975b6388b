"""`ctmm-jax`: the command-line tool (pseudobulk, fit, merge, simulate, gxemm, workflow).

Every subcommand reads files, calls the library and writes files; a mistake in the input ends
the run with one line on stderr (`ctmm-jax <command>: error: ...`) and exit code 1, never a
traceback (`--debug` shows it); Ctrl-C ends it with one line and exit code 130.

Outputs are written to a temporary file and moved into place in one step (files.py), so an
interrupted or failed run leaves no partial file; an existing output is replaced only with
`--force`, and a missing output folder is created (and said). Each output table gets a sidecar
`<output>.json`, written last, with the run's settings, the package version, (fit, gxemm) the JAX
setup, the sha256 of each input file, the table's rows, columns and sha256, and a fingerprint of
the settings; and `<output>.columns.tsv`, a dictionary of its columns. `merge` checks each chunk
against its sidecar and the chunks against each other before it writes anything.
JAX is imported only by the commands that compute, so `--help` and most mistakes are quick.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import sys
import time
import traceback
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd

from . import cellfiles
from .files import NPZ_ERRORS, atomic_paths, fingerprint, sha256_file

EXAMPLES = """\
examples:
  ctmm-jax simulate -o cells.h5ad --n-donors 60 --seed 1
  ctmm-jax pseudobulk cells.h5ad --ct-cut 5 -o pb.npz
  ctmm-jax fit pb.npz --model free --method reml --jackknife -o free.tsv
  # cluster array job: 20 chunks, then one table
  ctmm-jax fit pb.npz --chunk 3/20 -o out/free.3.tsv
  ctmm-jax merge out/free.*.tsv -o free.tsv
  # the original CTMM's text files for one gene
  ctmm-jax fit --y y.txt --P P.txt --ctnu ctnu.txt --shape ctp -o gene.tsv
  # GxEMM: traits by donor id, kinship from PLINK genotypes, sex as the environment
  ctmm-jax gxemm --y expression.tsv --bfile geno --donors donors.tsv --covars age,PC1 \\
      --env sex --gtype free --etype free --nonneg -o gxemm.tsv
  ctmm-jax gxemm --y y.txt --K K.txt --Z Z.txt --gtype free -o gxemm.tsv
  # all of it as a Snakemake workflow (pip install "ctmm_jax[workflow]")
  ctmm-jax workflow init w && snakemake -s w/Snakefile -d w --cores 2
"""
WORKFLOW_EXAMPLES = """\
examples:
  ctmm-jax workflow init w            # writes w/Snakefile and w/config.yaml
  snakemake -s w/Snakefile -d w --cores 2
  # the workflow's last steps (its rules run them)
  ctmm-jax workflow table free=results/free.tsv hom=results/hom.tsv --dataset pb.npz -o ctmm.tsv
  ctmm-jax workflow report ctmm.tsv --dataset pb.npz -o report
"""


class UserError(Exception):
    """A mistake in the command line or the inputs, reported as one line."""


# what input validation raises: UserError, the library's ValueError naming the input, file
# problems, and ImportError for a missing optional extra (anndata, pyarrow)
USER_ERRORS = (UserError, ValueError, OSError, ImportError)


class _ModelNames:
    """The names in `models.MODELS`, as `--model` choices, looked up when argparse first needs
    them (to check a `--model` value, for `fit --help`): importing `ctmm_jax.models` imports
    JAX, which `ctmm-jax --help` and most mistakes do without."""

    def _names(self) -> tuple[str, ...]:
        from .models import MODELS

        return tuple(MODELS)

    def __contains__(self, name) -> bool:
        return name in self._names()

    def __iter__(self):
        return iter(self._names())


CACHE_HELP = (
    "JAX's compilation cache folder, or 'off' (default: $CTMM_JAX_CACHE or "
    "~/.cache/ctmm_jax/xla): later runs, e.g. the other chunks of a --chunk array job, "
    "load the compiled programs instead of compiling them"
)


class Parser(argparse.ArgumentParser):
    """argparse, with a usage mistake reported as one line (not the usage block)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def main(argv: list[str] | None = None) -> int:
    """Run `ctmm-jax` with the arguments `argv` (default: sys.argv[1:]); returns the exit code:
    0, 1 for a mistake in the inputs, 130 when interrupted (a usage mistake exits 2 in argparse).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except KeyboardInterrupt:
        if args.debug:
            traceback.print_exc()
        print(f"ctmm-jax {args.command}: interrupted", file=sys.stderr)
        return 130
    except USER_ERRORS as err:
        # a failed import of our own modules is a bug, not a missing extra
        own = isinstance(err, ImportError) and (err.name or "").startswith("ctmm_jax")
        if args.debug or own:
            raise
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"ctmm-jax {args.command}: error: {message}", file=sys.stderr)
        return 1
    return 0


def run() -> None:
    """The console script and `python -m ctmm_jax`. An interrupted run (Ctrl-C, exit code 130)
    leaves at once with os._exit, after flushing its messages: the interpreter's normal
    teardown while XLA's threads are still compiling can crash (a segfault, exit 139). Its
    outputs are already safe: an interrupted write removes its temporary file (files.py)."""
    try:
        code = main()
    except KeyboardInterrupt:  # outside main's handler (while the parser is built)
        print("ctmm-jax: interrupted", file=sys.stderr)
        code = 130
    if code == 130:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)
    sys.exit(code)


def build_parser() -> argparse.ArgumentParser:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = Parser(
        prog="ctmm-jax",
        description="Cell type-specific linear mixed models (CTMM) for single-cell pseudobulk, "
        "and GxEMM, fitted for many genes at once with JAX.",
        epilog=EXAMPLES,
        formatter_class=formatter,
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"ctmm_jax {__version__}")
    parser.add_argument("--debug", action="store_true", help="on an error, show the traceback")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, run, help: str, computes: bool = False, group=None,
                epilog: str = EXAMPLES) -> argparse.ArgumentParser:  # fmt: skip
        """A subcommand, or with `group` (a `workflow` action) a subcommand of `group`."""
        parent = sub if group is None else group
        p = parent.add_parser(name, help=help, description=help, epilog=epilog,
                              formatter_class=formatter)  # fmt: skip
        if group is not None:  # errors say `ctmm-jax workflow init: ...`
            p.set_defaults(command=f"workflow {name}")
        p.add_argument("-q", "--quiet", action="store_true", help="no progress bar or summary")
        # SUPPRESS: when not given here, keep the value of `ctmm-jax --debug COMMAND`
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="on an error, show the traceback")  # fmt: skip
        p.add_argument("--force", action="store_true",
                       help="replace output files that exist (default: refuse)")  # fmt: skip
        if computes:
            p.add_argument("--cache", metavar="DIR", help=CACHE_HELP)
        p.set_defaults(run=run)
        return p

    p = command("pseudobulk", run_pseudobulk, "single cells -> a pseudobulk dataset (.npz)")
    p.add_argument(
        "input",
        help="cells x genes expression: .h5ad (AnnData), a 10x folder (matrix.mtx[.gz], "
        "features.tsv[.gz], barcodes.tsv[.gz]), .npz (scipy sparse), .mtx[.gz] (Matrix "
        "Market) or .tsv/.csv (header = genes, first column = cell ids)",
    )
    p.add_argument(
        "--cells",
        help="cell table (.tsv/.csv, header, one row per cell; with .h5ad input: instead of "
        "obs); matched to the matrix's cells by id when both have ids (--cell-id), else by "
        "row order; needed unless the input is .h5ad. Its donor and cell-type columns are "
        "read as text: only empty cells are missing (a donor named NA is a donor); all-integer "
        "ids are ordered as numbers (2 before 10)",
    )
    p.add_argument(
        "--cell-id",
        metavar="COLUMN",
        help="column of --cells with the cell ids (default: a first column with an empty "
        "header, as pandas' to_csv writes the index)",
    )
    p.add_argument(
        "--gene-names",
        help="gene names of .npz/.mtx input: one per line, or a 10x features.tsv[.gz] "
        "(gene id, symbol, type; --var-names picks the column)",
    )
    p.add_argument(
        "--var-names",
        choices=cellfiles.VAR_NAMES,
        default="gene_symbols",
        help="10x features: name genes by symbol (repeats made unique: X, X-1, ...; "
        "default, as scanpy) or by gene id",
    )
    p.add_argument(
        "--barcodes",
        help="cell ids of .npz/.mtx input, one per line (e.g. 10x barcodes.tsv[.gz])",
    )
    p.add_argument(
        "--genes-by-cells",
        action="store_true",
        help="the matrix is genes x cells (as 10x .mtx files; a 10x folder is read so anyway)",
    )
    p.add_argument(
        "--normalize",
        action="store_true",
        help="the input holds raw counts: use log1p(counts / cell total * 10,000) (scanpy's "
        "normalize_total + log1p), computed as the cells stream",
    )
    p.add_argument("--layer", help="AnnData layer to use instead of X (e.g. a log-normalised one)")
    p.add_argument("--donor", default="donor", help="donor column of the cell table")
    p.add_argument("--cell-type", default="cell_type", help="cell-type column of the cell table")
    p.add_argument("--ind-cut", type=int, default=0, help="drop donors with <= this many cells")
    p.add_argument(
        "--ct-cut",
        type=int,
        default=0,
        help="(donor, cell type) pairs with <= this many cells are missing",
    )
    p.add_argument("--chunk-size", type=int, default=2000, help="genes per streamed chunk")
    p.add_argument("-o", "--output", required=True, help="dataset to write (.npz)")

    p = command("fit", run_fit, "fit CTMM to every gene -> one row per gene (.tsv/.parquet)", True)
    p.add_argument("dataset", nargs="?", help="pseudobulk dataset (.npz from `pseudobulk`)")
    p.add_argument("--y", help="original-format y file of one gene (instead of a dataset)")
    p.add_argument("--P", help="original-format P file (with --y)")
    p.add_argument("--ctnu", help="original-format ctnu file (with --y, --shape ctp)")
    p.add_argument("--nu", help="original-format nu file (with --y, --shape op)")
    p.add_argument(
        "--n-cells",
        help="cells behind each value, same layout as P (with --y, --shape ctp): the noise is "
        "then pooled over donors (--noise pooled, the default) instead of the plug-in ctnu",
    )
    p.add_argument(
        "--shape",
        choices=("ctp", "op"),
        default="ctp",
        help="CTP (donor x cell type) or OP (one value per donor); default ctp",
    )
    # metavar: argparse would list the choices (import JAX) when the option is added
    p.add_argument("--model", choices=_ModelNames(), default="free", metavar="MODEL",
                   help="%(choices)s; default free")  # fmt: skip
    p.add_argument("--method", choices=("ml", "reml", "he"), default="reml", help="default reml")
    p.add_argument("--jackknife", nargs="?", const=True, default=False, type=int, metavar="K",
                   help="jackknife Wald tests too: leave one donor out, or with K the donors "
                   "in K groups, one group out at a time (K fits a gene instead of N)")  # fmt: skip
    p.add_argument(
        "--information",
        choices=("expected", "observed"),
        default="expected",
        help="information matrix of the Wald tests (ml/reml): expected (Fisher, as the "
        "original) or observed (Hessian); default expected",
    )
    p.add_argument("--robust", action="store_true",
                   help="donor-clustered sandwich Wald tests too (ML/REML; one evaluation a "
                   "gene instead of the jackknife's refits)")  # fmt: skip
    p.add_argument("--nonneg", action="store_true", help="constrain variances to be >= 0")
    p.add_argument(
        "--noise",
        choices=("pooled", "cells", "plugin"),
        help="noise variances: pooled (each cell type's within-pair variance pooled over "
        "donors; default for datasets, which know their cell counts), cells (the exact "
        "likelihood of the cells: the within-pair variances s2_<ct> fitted with the model; "
        "ML/REML) or plugin (ctnu as given, as the original; the only choice for --y/--P "
        "files without --n-cells)",
    )
    p.add_argument("--max-iter", type=int, default=200, help="optimizer iterations (default 200)")
    p.add_argument("--tol", type=float, default=1e-10, help="convergence tolerance (default 1e-10)")
    p.add_argument(
        "--fixed",
        action="append",
        default=[],
        metavar="NAME=FILE",
        help="fixed covariates (e.g. PCs): a table with the donor id in the first "
        "column (read as text: only empty cells are missing) and a header, or the original's "
        "headerless numbers in donor order",
    )
    p.add_argument(
        "--random",
        action="append",
        default=[],
        metavar="NAME=FILE",
        help="random covariates (e.g. batch): a table donor -> label (one-hot "
        "encoded; labels read as text, only empty cells are missing) or a numeric design, "
        "as --fixed",
    )
    p.add_argument("--genes", help="genes to fit: comma-separated names or a file (one per line)")
    p.add_argument(
        "--chunk",
        metavar="I/N",
        help="fit only the I-th of N equal parts of the genes "
        "(1 <= I <= N; e.g. $SLURM_ARRAY_TASK_ID/20); combine with `merge`",
    )
    p.add_argument(
        "--std",
        action="store_true",
        help="standardise each gene's OP first (the original's std; dataset input)",
    )
    p.add_argument(
        "--no-count-scale",
        dest="count_scale",
        action="store_false",
        help="keep a --shape ctp dataset's values on the log scale: by default a dataset made "
        "from raw counts (pseudobulk --normalize) divides each cell type's values by its "
        "count-scale loading (README, 'Count-scale loadings')",
    )
    p.add_argument(
        "--batch-genes",
        type=int,
        default=2048,
        help="genes per fit call (default 2048)",
    )
    p.add_argument(
        "--chunk-size",
        type=int,
        default=256,
        help="most genes per compiled batch (default 256; --memory may lower it)",
    )
    p.add_argument(
        "--memory",
        help="working memory of one compiled batch, e.g. 4GB (default 2GB): the batch is "
        "halved until the estimate fits; the sidecar records the budget and batch used",
    )
    p.add_argument(
        "--devices",
        help="split each batch's genes over K local devices (a number, or 'all': every GPU "
        "of the node); results equal a one-device fit's (see README)",
    )
    p.add_argument("-o", "--output", required=True, help="table to write (.tsv, .csv, .parquet)")

    p = command("merge", run_merge, "chunk outputs of `fit --chunk` -> one table")
    p.add_argument("inputs", nargs="+", help="the chunk tables (each with its .json sidecar)")
    p.add_argument("-o", "--output", required=True, help="table to write")

    p = command("simulate", run_simulate, "simulate single-cell counts with donor structure")
    p.add_argument(
        "-o",
        "--output",
        required=True,
        help=".h5ad (AnnData: X log-normalised, layers['counts']) or .npz (counts; "
        "writes <stem>.cells.tsv and <stem>.genes.txt beside it)",
    )
    p.add_argument("--n-genes", type=int, default=200)
    p.add_argument("--n-donors", type=int, default=40)
    p.add_argument("--n-celltypes", type=int, default=4)
    p.add_argument("--cells-per-donor", type=float, default=100.0)
    p.add_argument("--hom2", type=float, default=0.05, help="shared donor variance (log scale)")
    p.add_argument("--V", type=float, default=0.05, help="cell type-specific variance")
    p.add_argument("--seed", type=int, default=0)

    p = command("gxemm", run_gxemm, "fit GxEMM (gene-by-environment heritability) to many "
                "traits -> one row per trait", True)  # fmt: skip
    p.add_argument(
        "--y",
        required=True,
        help="traits, matched to the other inputs by donor id: an expression table (.tsv/.csv"
        "[.gz]) genes x donors (an optional first column of gene ids) or donors x genes (the "
        "axis holding the donor ids is found by matching them), or BED-like (#Chr start end "
        "phenotype_id, then a column per donor); or, with --K/--Z number files, the original's "
        "numbers: N values or N x T, donors in the files' order",
    )
    p.add_argument("--y-format", choices=("auto", "table", "bed"), default="auto",
                   help="auto (default): bed when the first header cell is #Chr")  # fmt: skip
    p.add_argument(
        "--bfile",
        metavar="PREFIX",
        help="PLINK genotypes PREFIX.bed/.bim/.fam (individuals by the .fam's IID): K = the "
        "GRM of the donors used (gxemm.grm); or --K",
    )
    p.add_argument("--maf", type=float,
                   help="--bfile: minimum minor allele frequency (default 0.01)")  # fmt: skip
    p.add_argument("--max-missing", type=float,
                   help="--bfile: maximum missing rate of a variant (default 0.05)")  # fmt: skip
    p.add_argument(
        "--K",
        help="kinship instead of --bfile: with --donors, a table with the donor ids in its "
        "header and first column; without, the original's N x N numbers (donor order)",
    )
    p.add_argument(
        "--donors",
        help="donor table (.tsv/.csv, header, one row per donor, read as text: only empty "
        "cells are missing) with the covariates and the environment",
    )
    p.add_argument("--donor-col", metavar="COLUMN",
                   help="column of --donors with the donor ids (default: the first)")  # fmt: skip
    p.add_argument("--covars", metavar="A,B,...",
                   help="fixed covariates: numeric columns of --donors, comma-separated "
                   "(any units: the fit centres and scales them)")  # fmt: skip
    p.add_argument(
        "--env",
        metavar="COLUMN",
        help="column of --donors with discrete environments (integer codes or labels; levels "
        "sorted, as numbers when all are integers): one-hot Z, one column per level",
    )
    p.add_argument(
        "--no-env-effects",
        action="store_true",
        help="leave the environments' main effects out of the fixed effects (default: "
        "added, every level but the last; with --Z, Z's columns that X does not span)",
    )
    p.add_argument("--intersect", action="store_true",
                   help="use the donors present in all inputs (default: refuse ids that do not "
                   "match)")  # fmt: skip
    p.add_argument("--normalize", choices=("none", "logcpm"), default="none",
                   help="logcpm: --y holds counts; use log1p(counts per million) per donor "
                   "(totals over all the file's genes)")  # fmt: skip
    p.add_argument("--min-expressed", type=float, default=0.0, metavar="SHARE",
                   help="fit only genes with a value > 0 in at least this share of the donors "
                   "(e.g. 0.9; default 0: all)")  # fmt: skip
    p.add_argument("--Z", help="the original's N x L environments (numbers; with --K numbers)")
    p.add_argument("--X", help="the original's N x q covariates (numbers; an intercept is added)")
    p.add_argument("--gtype", choices=("hom", "iid", "free"), default="hom",
                   help="genetic variance: shared (default), plus one GxE term, or one per "
                   "environment")  # fmt: skip
    p.add_argument("--etype", choices=("hom", "free"), default="hom",
                   help="noise: shared (default) or one per environment")  # fmt: skip
    p.add_argument("--method", choices=("reml", "he"), default="reml", help="default reml")
    p.add_argument("--nonneg", action="store_true",
                   help="constrained REML: genetic components and the noise of I >= 0")  # fmt: skip
    p.add_argument(
        "--lrt",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also fit gtype hom (same etype) for p_gxe_lrt (default: on for --gtype iid and "
        "free with REML)",
    )
    p.add_argument("--chunk-size", type=int,
                   help="traits per compiled batch (default 8 with a dense K)")  # fmt: skip
    p.add_argument("--max-iter", type=int, default=100, help="REML iterations (default 100)")
    p.add_argument("--tol", type=float, default=1e-8, help="convergence tolerance (default 1e-8)")
    p.add_argument("-o", "--output", required=True, help="table to write (.tsv, .csv, .parquet)")

    about = "the Snakemake workflow: cells -> pseudobulk -> chunked fits -> one table, a report"
    p = sub.add_parser("workflow", help=about, description=about, epilog=WORKFLOW_EXAMPLES,
                       formatter_class=formatter)  # fmt: skip
    group = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = command("init", run_workflow_init, "write the workflow (Snakefile, config.yaml) to DIR",
                group=group, epilog=WORKFLOW_EXAMPLES)  # fmt: skip
    p.add_argument("directory", metavar="DIR", help="folder to write it to (created if missing)")
    p = command("table", run_workflow_table, "merged fits of several models -> one table, with "
                "the LRT of the main model against its null and q values", group=group,
                epilog=WORKFLOW_EXAMPLES)  # fmt: skip
    p.add_argument("fits", nargs="+", metavar="MODEL=TABLE",
                   help="each model's table (from `merge`, or an unchunked `fit`)")  # fmt: skip
    p.add_argument("--main", metavar="MODEL", help="the main model (default: the first)")
    p.add_argument("--dataset", required=True, help="the pseudobulk dataset the fits read")
    p.add_argument("-o", "--output", required=True, help="table to write (.tsv, .csv, .parquet)")
    p = command("report", run_workflow_report, "a `workflow table` -> QQ plot, variance "
                "partition, summary.json", group=group, epilog=WORKFLOW_EXAMPLES)  # fmt: skip
    p.add_argument("table", help="the table of `ctmm-jax workflow table` (with its sidecar)")
    p.add_argument("--dataset", help="the pseudobulk dataset the fits read (for the variance "
                   "partition)")  # fmt: skip
    p.add_argument(
        "--no-variance-partition",
        action="store_true",
        help="leave the variance partition out (it reads the whole dataset)",
    )
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="report folder")
    return parser


# ---------------------------------------------------------------------------------- reading


def _existing(path: str | None, what: str) -> Path:
    if path is None:
        raise UserError(f"{what}: no file given.")
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{what}: no such file {path!r}; check the path.")
    return p


def _is(path: Path, *suffixes: str) -> bool:
    name = path.name.lower()
    return any(name.endswith(s) for s in suffixes)


def _read_table(path: Path, what: str, *, labels=(), index: bool = False) -> pd.DataFrame:
    """A .tsv/.csv (or .parquet) table with a header; with `index`, its first column is the row
    index. `labels` (column names or positions) are label columns: donor ids, cell types, gene
    names, batches. They are read as text, with only empty cells missing, so a donor named 'NA'
    or '007' stays 'NA' or '007'; other columns as pandas reads them ('NA', 'nan', ... are
    missing values). A byte-order mark (utf-8-sig) is dropped."""
    if _is(path, ".parquet"):
        return pd.read_parquet(path)  # typed: labels are what was written, the index too
    sep = "," if _is(path, ".csv", ".csv.gz") else "\t"
    try:
        table = pd.read_csv(path, sep=sep, encoding="utf-8-sig",
                            converters={c: str for c in labels})  # fmt: skip
    except (ValueError, pd.errors.ParserError) as err:
        raise UserError(
            f"{what}: cannot read {path} as a {sep!r}-separated table ({err})."
        ) from err
    for c in labels:
        if isinstance(c, int) and c >= table.shape[1]:
            continue
        name = table.columns[c] if isinstance(c, int) else c
        if name in table:
            table[name] = table[name].mask(table[name] == "")  # an empty cell: missing
    if index:
        if table.shape[1] == 0:
            raise UserError(f"{what}: {path} has no columns.")
        table = table.set_index(table.columns[0])
    return table


def _read_matrix(path: Path, args):
    """(cells x genes matrix, gene names or None, cell ids or None) from a 10x folder, .npz,
    .mtx[.gz] or .tsv/.csv."""
    from scipy import sparse

    if path.is_dir():
        if args.gene_names or args.barcodes:
            raise UserError("--gene-names, --barcodes: a 10x folder has its own; drop them.")
        return cellfiles.read_10x(path, args.var_names)
    if _is(path, ".npz"):
        try:
            with open(path, "rb") as handle:  # np.load leaks a path's handle on a bad zip
                X = sparse.load_npz(handle)
        except NPZ_ERRORS as err:
            raise UserError(
                f"input: {path}: not a scipy.sparse .npz matrix, or truncated or damaged "
                f"({type(err).__name__}: {err})."
            ) from None
        names = ids = None
    elif _is(path, ".mtx", ".mtx.gz"):
        X, names, ids = cellfiles.read_mtx(path), None, None
    elif _is(path, ".tsv", ".csv", ".tsv.gz", ".csv.gz", ".txt"):
        table = _read_table(path, "input", labels=[0], index=True)
        X, names, ids = table.to_numpy(np.float64), [str(c) for c in table.columns], table.index
    else:
        raise UserError(f"input: {path.name}: use .h5ad, a 10x folder, .npz, .mtx, .tsv or .csv.")
    X = X.T if args.genes_by_cells else X
    if args.gene_names:
        names, keep = cellfiles.read_features(_existing(args.gene_names, "--gene-names"),
                                              args.var_names)  # fmt: skip
        if keep is not None and len(keep) == X.shape[1]:  # 10x features: genes only
            X, names = X[:, np.flatnonzero(keep)], list(np.asarray(names)[keep])
    if args.barcodes:
        ids = cellfiles.read_lines(_existing(args.barcodes, "--barcodes"))
    return X, names, ids


def _read_gene_list(value: str) -> list[str]:
    """--genes: a file with one name per line (a byte-order mark dropped), or comma-separated
    names."""
    p = Path(value)
    if p.is_file():
        try:
            names = [s.strip() for s in p.read_text(encoding="utf-8-sig").splitlines()]
        except UnicodeDecodeError as err:
            raise UserError(f"{value}: not a UTF-8 text file of gene names ({err}).") from None
    else:
        names = [s.strip() for s in value.split(",")]
    names = [s for s in names if s]
    if not names:
        raise UserError("--genes: no gene names given.")
    return names


def _read_covariate(spec: str, option: str):
    """--fixed/--random NAME=FILE -> (name, DataFrame indexed by donor, or a path)."""
    name, sep, path = spec.partition("=")
    if not sep or not name or not path:
        raise UserError(f"{option} {spec!r}: write NAME=FILE, e.g. {option} pca=pcs.tsv.")
    p = _existing(path, f"{option} {name}")
    try:  # the original's format: whitespace-separated numbers, donors in the data's order
        np.loadtxt(p, ndmin=2, encoding="utf-8-sig")
        return name, str(p)
    except ValueError:
        pass
    what = f"{option} {name}"
    table = _read_table(p, what, labels=[0], index=True)
    if table.shape[1] == 0:
        raise UserError(f"{what}: {p} has one column; give the donor id, then values.")
    if (
        option == "--random"
        and table.shape[1] == 1
        and not pd.api.types.is_numeric_dtype(table.iloc[:, 0])
    ):
        # labels, one-hot encoded by the fit (NA refused there): read as text, as the ids
        return name, _read_table(p, what, labels=[0, 1], index=True).iloc[:, 0]
    return name, table


def _parse_chunk(value: str | None) -> tuple[int, int] | None:
    if value is None:
        return None
    try:
        i, n = (int(x) for x in value.split("/"))
    except ValueError:
        raise UserError(f"--chunk {value!r}: write I/N, e.g. --chunk 3/20.") from None
    if not 1 <= i <= n:
        raise UserError(f"--chunk {value!r}: need 1 <= I <= N (chunks are numbered from 1).")
    return i, n


# ---------------------------------------------------------------------------------- writing


def _check_output(path: str) -> Path:
    """The output table's path, checked before any work: a known extension, and pyarrow
    installed for .parquet."""
    out = Path(path)
    if not _is(out, ".tsv", ".csv", ".parquet", ".txt", ".tsv.gz", ".csv.gz"):
        raise UserError(f"-o {path}: use a .tsv, .csv or .parquet file name.")
    if _is(out, ".parquet"):
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise ImportError(
                'writing .parquet needs pyarrow: pip install "ctmm_jax[parquet]", or use .tsv.'
            ) from None
    return out


def _table_files(out: Path) -> list[Path]:
    """The files written for an output table: the table, its column dictionary, its sidecar
    (last: merge trusts a table only as its sidecar describes it)."""
    return [out, Path(f"{out}.columns.tsv"), Path(f"{out}.json")]


def _claim_outputs(args, paths: list[Path]) -> None:
    """Check the files a command will write, before any work: one that exists is replaced only
    with --force; a missing output folder is created, and said (so a mistyped path is seen at
    the start, not after the run)."""
    for path in paths:
        if path.is_dir():
            raise UserError(f"-o {path}: is a folder; give a file name.")
        if path.exists() and not args.force:
            raise UserError(f"{path} exists; pass --force to overwrite it.")
    folder = paths[0].parent
    if not folder.is_dir():
        if folder.exists():
            raise UserError(f"-o {paths[0]}: {folder} is not a folder.")
        folder.mkdir(parents=True, exist_ok=True)  # another chunk of an array job may too
        print(f"ctmm-jax {args.command}: created the output folder {folder}", file=sys.stderr)


@contextmanager
def _replacing(*paths: Path):
    """files.atomic_paths, with a failed write (a full disk, a file-size limit, no permission)
    reported as one line naming the output."""
    try:
        with atomic_paths(*paths) as temporary:
            yield temporary
    except OSError as err:
        raise UserError(f"{paths[0]}: cannot write it ({err}); no output was replaced.") from None


# sidecar keys that describe one output rather than the run: they may differ between the chunks
# of one run. The others (the settings, the inputs' sha256) must agree; settings_sha256 is their
# fingerprint. "input" is the dataset's path as given: chunks compare its content (input_sha256).
PER_OUTPUT = ("output", "input", "chunk", "gene_positions", "n_genes", "n_converged", "seconds",
              "environment", "batching", "merged", "table", "settings_sha256")  # fmt: skip


def _shared_settings(sidecar: dict) -> dict:
    return {k: v for k, v in sidecar.items() if k not in PER_OUTPUT}


def _input_sha256(files: dict[str, str | None]) -> dict[str, str]:
    """{role: sha256 of the file's content} for the input files given (None: not given)."""
    return {role: sha256_file(path) for role, path in files.items() if path is not None}


def _write_table(
    table: pd.DataFrame, out: Path, settings: dict, dictionary: pd.DataFrame | None = None
) -> Path:
    """Write the table (by extension), its column dictionary <out>.columns.tsv (`dictionary`,
    by default results.column_dictionary) and its sidecar <out>.json, each to a temporary file
    first; they replace the outputs together at the end, the sidecar last (files.atomic_paths).

    The sidecar holds the settings, `table` (the table's file name, rows, columns and sha256)
    and `settings_sha256` (the fingerprint of the settings that chunks of one run share)."""
    from . import __version__
    from .results import column_dictionary

    with _replacing(*_table_files(out)) as (tmp_table, tmp_columns, tmp_sidecar):
        if _is(out, ".parquet"):
            table.to_parquet(tmp_table)
        else:
            table.to_csv(tmp_table, sep="," if _is(out, ".csv", ".csv.gz") else "\t")
        if dictionary is None:
            dictionary = column_dictionary(table.columns)
        dictionary.to_csv(tmp_columns, sep="\t", index=False)
        sidecar = {"ctmm_jax_version": __version__, "output": out.name, **settings}
        sidecar = json.loads(json.dumps(sidecar, default=str))  # as merge will read it back
        sidecar["table"] = {"file": out.name, "rows": len(table),
                            "columns": [str(c) for c in table.columns],
                            "sha256": sha256_file(tmp_table)}  # fmt: skip
        sidecar["settings_sha256"] = fingerprint(_shared_settings(sidecar))
        tmp_sidecar.write_text(json.dumps(sidecar, indent=2) + "\n")
    return out


def _use_cache(value: str | None) -> None:
    """--cache: point JAX's persistent compilation cache at a folder, or turn it off (before
    JAX is imported; ctmm_jax.compilation_cache_dir is the default)."""
    if value is None:
        return
    path = None if value.strip().lower() in ("off", "0", "") else value
    if path is None:
        os.environ.pop("JAX_COMPILATION_CACHE_DIR", None)
    else:
        os.environ["JAX_COMPILATION_CACHE_DIR"] = path
    if "jax" in sys.modules:
        sys.modules["jax"].config.update("jax_compilation_cache_dir", path)


def _jax_setup() -> dict:
    """JAX and jaxlib versions, default device, float64 setting and compilation cache, for the
    sidecar of a command that computes (importing JAX takes a second)."""
    import jax
    import jaxlib

    device = jax.devices()[0]
    return {"jax": jax.__version__, "jaxlib": jaxlib.__version__, "device": str(device),
            "platform": device.platform, "x64": bool(jax.config.jax_enable_x64),
            "compilation_cache": jax.config.jax_compilation_cache_dir}  # fmt: skip


def _say(args, message: str) -> None:
    if not args.quiet:
        print(message, file=sys.stderr)


# ---------------------------------------------------------------------------------- commands


def run_pseudobulk(args) -> None:
    from . import preprocess

    source = _existing(args.input, "input") if not Path(args.input).is_dir() else Path(args.input)
    kw = dict(donor=args.donor, cell_type=args.cell_type, ind_cut=args.ind_cut,
              ct_cut=args.ct_cut, chunk_size=args.chunk_size, cell_id=args.cell_id,
              normalize="log1p" if args.normalize else None)  # fmt: skip
    out = Path(args.output)
    if not _is(out, ".npz"):
        raise UserError(f"-o {args.output}: the dataset is written as .npz; name it *.npz.")
    _claim_outputs(args, [out])
    cells = None if args.cells is None else cellfiles.read_cells(
        _existing(args.cells, "--cells"), "--cells")  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", preprocess.ExpressionWarning)
        if _is(source, ".h5ad"):
            adata = cellfiles.read_h5ad(source)  # backed: streamed, never all in memory
            name = source.name if args.layer is None else f"{source.name} layer {args.layer!r}"
            try:
                pb = preprocess.from_anndata(adata, layer=args.layer, cells=cells,
                                             x_name=name, **kw)  # fmt: skip
            except OSError as err:  # HDF5 cannot read a block: a damaged file
                message = f"{source}: cannot read its data ({err}); the file may be corrupt."
                raise UserError(message) from None
        else:
            if cells is None:
                raise UserError("--cells: give the cell table (donor and cell type of each cell).")
            X, names, ids = _read_matrix(source, args)
            pb = preprocess.pseudobulk(X, cells, genes=names, row_ids=ids, x_name=source.name,
                                       **kw)  # fmt: skip
    for w in caught:  # ours as one line each; others as Python shows them
        if issubclass(w.category, preprocess.ExpressionWarning):
            print(f"ctmm-jax pseudobulk: warning: {w.message}", file=sys.stderr)
        else:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    try:
        pb.save(out)  # replaced in one step (files.atomic_paths)
    except OSError as err:
        raise UserError(f"{out}: cannot write it ({err}); no output was replaced.") from None
    G, N, C = pb.ctp.shape
    zero = int((pb.mask & ~pb.observed).sum())
    _say(args, f"wrote {args.output}: {G} genes, {N} donors, {C} cell types; "
         f"{int((~pb.mask).sum())} of {N * C} (donor, cell type) pairs have <= "
         f"max(ct_cut, 1) cells (missing); {zero} gene x pair values have zero variance "
         "(missing only in fits with --noise plugin).")  # fmt: skip


def _chunk_bounds(total: int, chunk: tuple[int, int] | None) -> tuple[int, int]:
    """Positions lo:hi of chunk I of N among `total` genes: N parts as equal as can be, the
    first total % N one gene longer (np.array_split's rule); `fit --chunk` and `merge` both
    use this."""
    if chunk is None:
        return 0, total
    i, n = chunk
    size, longer = divmod(total, n)
    lo = (i - 1) * size + min(i - 1, longer)
    return lo, lo + size + (i <= longer)


def _load_data(args):
    """CTPData/OPData from the dataset (gene selection, chunk, std) or original-format files,
    and the sidecar's record of the gene selection: the selected genes (their number and
    fingerprint, before chunking), the chunk and the positions of its genes among them."""
    from . import preprocess
    from .data import CTPData, OPData

    chunk = _parse_chunk(args.chunk)
    if args.dataset is None:
        if args.y is None:
            raise UserError("give a dataset (.npz from `ctmm-jax pseudobulk`) or --y/--P files.")
        if args.genes or chunk or args.std:
            raise UserError("--genes, --chunk and --std need a dataset (the files hold one gene).")
        y, P = _existing(args.y, "--y"), _existing(args.P, "--P")
        if args.n_cells is not None and args.shape != "ctp":
            raise UserError("--n-cells: pools the CTP noise; use it with --shape ctp and --ctnu.")
        if args.shape == "ctp":
            n_cells = None if args.n_cells is None else _existing(args.n_cells, "--n-cells")
            data = CTPData.from_files(y=y, P=P, ctnu=_existing(args.ctnu, "--ctnu"),
                                      n_cells=n_cells)  # fmt: skip
        else:
            data = OPData.from_files(y=y, P=P, nu=_existing(args.nu, "--nu"))
        selected = list(data.genes)
        lo, hi, scaled = 0, len(selected), False
    else:
        if args.y is not None:
            raise UserError("give either a dataset or --y/--P files, not both.")
        if args.n_cells is not None:
            raise UserError("--n-cells: goes with the original's files; a dataset has its counts.")
        try:
            pb = preprocess.Pseudobulk.load(_existing(args.dataset, "dataset"))
        except ValueError as err:
            raise UserError(str(err)) from None
        idx = np.arange(len(pb.genes))
        if args.genes:
            wanted = _read_gene_list(args.genes)
            unknown = [g for g in wanted if g not in set(pb.genes)]
            if unknown:
                raise UserError(
                    f"--genes: {len(unknown)} of {len(wanted)} genes are not in {args.dataset} "
                    f"(e.g. {unknown[0]!r}); its genes are named like {pb.genes[0]!r}."
                )
            position = {g: j for j, g in enumerate(pb.genes)}
            idx = np.array([position[g] for g in dict.fromkeys(wanted)])
        selected = [pb.genes[j] for j in idx]
        lo, hi = _chunk_bounds(len(idx), chunk)
        if hi == lo:
            raise UserError(f"--chunk {args.chunk}: more chunks than genes ({len(idx)}).")
        pb = pb.select_genes(idx[lo:hi])
        if args.std:
            pb = preprocess.std(pb)
        data = pb.to_ctp(args.count_scale) if args.shape == "ctp" else pb.to_op()
        scaled = args.shape == "ctp" and args.count_scale and pb.loadings is not None
    record = {"chunk": args.chunk, "gene_positions": [int(lo), int(hi)],
              "genes_selected": {"n": len(selected), "sha256": fingerprint(selected)},
              "count_scale": bool(scaled)}  # fmt: skip
    return data, record


def _fit_inputs(args) -> dict[str, str | None]:
    """The input files of `fit`, by role (their content's sha256 goes to the sidecar)."""
    if args.dataset is not None:
        files = {"dataset": args.dataset}
    else:
        noise = {"ctnu": args.ctnu} if args.shape == "ctp" else {"nu": args.nu}
        files = {"y": args.y, "P": args.P, **noise, "n_cells": args.n_cells}
    for option in ("fixed", "random"):
        for spec in getattr(args, option):
            name, _, path = spec.partition("=")
            files[f"--{option} {name}"] = path
    if args.genes and Path(args.genes).is_file():
        files["--genes"] = args.genes
    return files


def _devices_option(value: str | None) -> int | str | None:
    """--devices: None, 'all' or a whole number >= 1."""
    if value is None or value == "all":
        return value
    if not value.isdigit() or int(value) < 1:
        raise UserError(f"--devices {value}: give a number of devices >= 1, or 'all'.")
    return int(value)


def run_fit(args) -> None:
    out = _check_output(args.output)
    _claim_outputs(args, _table_files(out))
    _use_cache(args.cache)
    for flag in ("batch_genes", "chunk_size", "max_iter"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag.replace('_', '-')}: must be >= 1.")
    if not args.tol > 0:
        raise UserError("--tol: must be > 0.")
    n_devices = _devices_option(args.devices)
    data, record = _load_data(args)
    fixed = dict(_read_covariate(s, "--fixed") for s in args.fixed)
    random = dict(_read_covariate(s, "--random") for s in args.random)
    inputs = _input_sha256(_fit_inputs(args))
    from . import noise
    from .api import fit  # imports JAX: after the quick checks of the inputs
    from .devices import mesh
    from .progress import Progress
    from .results import column_dictionary, with_qvalues

    try:
        mesh(n_devices)  # a clear error before any data is fitted
    except ValueError as err:
        raise UserError(f"--devices: {err}") from None

    if data.n_cells is None and args.noise in ("pooled", "cells"):
        raise UserError(f"--noise {args.noise}: needs cell counts: a dataset, or --n-cells "
                        "with the original's files.")  # fmt: skip
    if data.n_cells is None and args.noise is None:
        print(f"ctmm-jax fit: warning: {noise.plugin_warning(data)}", file=sys.stderr)
    options = dict(noise=noise.resolve(data, args.noise),
                   jackknife=args.jackknife, robust=args.robust,
                   information=args.information, nonneg=args.nonneg,
                   chunk_size=args.chunk_size, max_iter=args.max_iter, tol=args.tol,
                   memory=args.memory)  # fmt: skip
    G = data.shape[0]
    start = time.perf_counter()
    tables = []
    bar = Progress(G, f"{args.shape} {args.model} {args.method}", enabled=not args.quiet)
    try:
        for lo in range(0, G, args.batch_genes):
            part = data.select_genes(slice(lo, lo + args.batch_genes))
            result = fit(part, args.model, args.method, **options, progress=bar,
                         fixed_covars=fixed or None, random_covars=random or None,
                         devices=n_devices)  # fmt: skip
            tables.append(result.table)
    finally:
        bar.close()
    table = with_qvalues(pd.concat(tables))  # q values over all the genes, not per batch
    seconds = time.perf_counter() - start
    meanings = column_dictionary(table.columns).set_index("column")["meaning"]
    settings = {
        "command": "fit",
        "input": args.dataset or {"y": args.y, "P": args.P, "ctnu": args.ctnu, "nu": args.nu},
        "input_sha256": inputs,
        "shape": args.shape, "model": args.model, "method": args.method, **options,
        "std": args.std, "fixed": args.fixed, "random": args.random, "genes": args.genes,
        **record, "batching": result.batching,
        "n_genes": int(G), "n_converged": int(table["converged"].sum()),
        "tests": {c: meanings[c] for c in table.columns if c.startswith("p_")},
        "seconds": round(seconds, 3), "environment": _jax_setup(),
    }  # fmt: skip
    _write_table(table, out, settings)
    _say(args, f"wrote {out}: {G} genes ({settings['n_converged']} converged) in {seconds:.1f} s.")


# ------------------------------------------------------------------------------------ merge

CHUNK_LABEL = re.compile(r"([0-9]+)/([0-9]+)")
HEX64 = re.compile(r"[0-9a-f]{64}")


class Part(NamedTuple):
    """One merge input, checked against its sidecar."""

    path: str
    meta: dict  # the sidecar
    chunk: tuple[int, int] | None  # (I, N)
    table: pd.DataFrame


def _read_sidecar(sidecar: Path) -> dict:
    """The sidecar's JSON object, or a UserError naming the file and what is wrong."""
    try:
        meta = json.loads(sidecar.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{sidecar}: not valid JSON ({err}); run `fit` again for it.") from None
    if not isinstance(meta, dict):
        kind = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
            type(meta), "a number"
        )
        raise UserError(
            f"{sidecar}: {kind}, not the JSON object `fit` writes; run `fit` again for it."
        )
    return meta


def _sidecar_error(sidecar: Path, what: str) -> UserError:
    return UserError(f"{sidecar}: {what} (written by an older ctmm_jax, or edited by hand); "
                     "run `fit` again for it.")  # fmt: skip


def _is_count(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _check_sidecar(meta: dict, sidecar: Path) -> tuple[int, int] | None:
    """Check that a `fit` sidecar has what merge relies on, of the right types; returns its
    chunk (I, N), or None for an unchunked fit."""
    label = meta.get("chunk")
    match = CHUNK_LABEL.fullmatch(label) if isinstance(label, str) else None
    chunk = (int(match[1]), int(match[2])) if match else None
    if label is not None and not (chunk and 1 <= chunk[0] <= chunk[1]):
        raise _sidecar_error(sidecar, f"chunk label {label!r} is not I/N with 1 <= I <= N")
    facts = meta.get("table")
    if not (
        isinstance(facts, dict)
        and _is_count(facts.get("rows"))
        and isinstance(facts.get("columns"), list)
        and all(isinstance(c, str) for c in facts["columns"])
        and isinstance(facts.get("sha256"), str)
        and HEX64.fullmatch(facts["sha256"])
    ):
        raise _sidecar_error(sidecar, "no valid record of its table's rows, columns and sha256")
    positions = meta.get("gene_positions")
    selected = meta.get("genes_selected")
    if not (
        isinstance(positions, list)
        and len(positions) == 2
        and all(_is_count(x) for x in positions)
        and isinstance(selected, dict)
        and _is_count(selected.get("n"))
        and isinstance(selected.get("sha256"), str)
    ):
        raise _sidecar_error(sidecar, "no valid record of the genes it holds")
    inputs = meta.get("input_sha256")
    if not (isinstance(inputs, dict) and all(isinstance(v, str) for v in inputs.values())):
        raise _sidecar_error(sidecar, "no valid sha256 of its input files")
    if meta.get("settings_sha256") != fingerprint(_shared_settings(meta)):
        raise _sidecar_error(sidecar, "its settings do not match their fingerprint")
    return chunk


def _read_part(path: str) -> Part:
    """A merge input: its sidecar read and checked, then the table checked against it (sha256,
    rows, columns)."""
    table_path = _existing(path, "merge input")
    sidecar = Path(f"{table_path}.json")
    if not sidecar.is_file():
        raise UserError(f"{path}: no sidecar {sidecar.name}; merge takes outputs of `fit`.")
    meta = _read_sidecar(sidecar)
    if meta.get("command") != "fit":
        raise UserError(f"{path}: not an output of `ctmm-jax fit` ({sidecar.name} says "
                        f"command {meta.get('command')!r}).")  # fmt: skip
    chunk = _check_sidecar(meta, sidecar)
    facts = meta["table"]
    if sha256_file(table_path) != facts["sha256"]:
        raise UserError(
            f"{path}: its content does not match the sha256 in {sidecar.name}: the table was "
            "changed or cut short after `fit` wrote it (e.g. by another run killed while "
            "writing); run `fit` again for it."
        )
    table = _read_table(table_path, "merge input", labels=[0], index=True)
    if len(table) != facts["rows"]:
        raise UserError(f"{path}: has {len(table)} rows, its sidecar says {facts['rows']}.")
    if list(table.columns) != facts["columns"]:
        missing = [c for c in facts["columns"] if c not in table.columns]
        raise UserError(f"{path}: its columns differ from those in its sidecar "
                        f"(missing: {missing[:5]}).")  # fmt: skip
    start, stop = meta["gene_positions"]
    if "converged" not in table:
        raise UserError(f"{path}: not the columns of a `fit` table (no 'converged').")
    if stop - start != len(table):
        raise UserError(f"{path}: has {len(table)} genes, its sidecar's gene positions "
                        f"{start}:{stop} say {stop - start}.")  # fmt: skip
    return Part(path, meta, chunk, table)


def _check_parts(parts: list[Part]) -> list[Part]:
    """Check that the parts are the chunks of one run, every chunk once; returns them in chunk
    order."""
    first = parts[0]
    for part in parts[1:]:
        a, b = first.meta["input_sha256"], part.meta["input_sha256"]
        if a != b:
            differ = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
            raise UserError(f"{part.path}: fitted to other input files than {first.path} "
                            f"(the content of {differ} differs).")  # fmt: skip
        s, s0 = _shared_settings(part.meta), _shared_settings(first.meta)
        if s != s0:
            diff = sorted(k for k in s.keys() | s0.keys() if s.get(k) != s0.get(k))
            raise UserError(f"{part.path}: fitted with other settings than {first.path} ({diff}).")
    unchunked = [p for p in parts if p.chunk is None]
    if unchunked and len(unchunked) < len(parts):
        raise UserError(f"{unchunked[0].path}: not a chunk (fitted without --chunk); merge the "
                        "chunks of one run.")  # fmt: skip
    if len(unchunked) > 1:
        raise UserError(f"{unchunked[1].path}: a second unchunked output; merge the chunks of "
                        "one run.")  # fmt: skip
    if not unchunked:
        n = first.chunk[1]
        by_chunk = {}
        for part in parts:
            if part.chunk[1] != n:
                raise UserError(f"{part.path}: chunk {part.meta['chunk']} of another run than "
                                f"{first.path} (chunk {first.meta['chunk']}).")  # fmt: skip
            if part.chunk in by_chunk:
                raise UserError(f"{part.path}: chunk {part.meta['chunk']} is given twice (also "
                                f"as {by_chunk[part.chunk].path}).")  # fmt: skip
            by_chunk[part.chunk] = part
        missing = [i for i in range(1, n + 1) if (i, n) not in by_chunk]
        if missing:
            raise UserError(f"missing chunks {missing} of {n}: run `fit --chunk I/{n}` for them.")
        parts = [by_chunk[i, n] for i in range(1, n + 1)]
    total = first.meta["genes_selected"]["n"]
    for part in parts:
        lo, hi = _chunk_bounds(total, part.chunk)
        start, stop = part.meta["gene_positions"]
        if (start, stop) != (lo, hi):
            label = f"chunk {part.meta['chunk']}" if part.chunk else "an unchunked fit"
            raise UserError(f"{part.path}: as {label} of {total} genes it should hold genes "
                            f"{lo + 1}-{hi}, its sidecar says {start + 1}-{stop}.")  # fmt: skip
    return parts


def run_merge(args) -> None:
    out = _check_output(args.output)
    _claim_outputs(args, _table_files(out))
    parts = _check_parts([_read_part(path) for path in args.inputs])
    table = pd.concat([p.table for p in parts])
    selected = parts[0].meta["genes_selected"]
    if fingerprint([str(g) for g in table.index]) != selected["sha256"]:
        raise UserError(
            f"the chunks' genes, in chunk order, are not the {selected['n']} genes their fits "
            "selected (their fingerprint differs): a chunk was changed after `fit` wrote it."
        )
    from .results import with_qvalues

    table = with_qvalues(table)  # over all the genes: a chunk's q values count its genes only
    first = parts[0].meta
    merged = {**_shared_settings(first), "input": first.get("input"), "chunk": None,
              "gene_positions": [0, len(table)], "merged": [p.path for p in parts],
              "n_genes": len(table), "n_converged": int(table["converged"].sum())}  # fmt: skip
    _write_table(table, out, merged)
    _say(args, f"wrote {out}: {len(table)} genes from {len(parts)} tables.")


# ------------------------------------------------------------------------- simulate, gxemm


def run_simulate(args) -> None:
    from scipy import sparse

    from .simulation import simulate_anndata, simulate_cells

    out = Path(args.output)
    kw = dict(cells_per_donor=args.cells_per_donor, hom2=args.hom2, V=args.V, seed=args.seed)
    shape = (args.n_genes, args.n_donors, args.n_celltypes)
    if min(shape) < 1:
        raise UserError("--n-genes, --n-donors and --n-celltypes must be >= 1.")
    if _is(out, ".h5ad"):
        _claim_outputs(args, [out])
        adata = simulate_anndata(*shape, **kw)
        with _replacing(out) as (tmp,):
            adata.write_h5ad(tmp)
        n_cells = adata.n_obs
    elif _is(out, ".npz"):
        stem = str(out)[: -len(".npz")]
        files = [out, Path(f"{stem}.cells.tsv"), Path(f"{stem}.genes.txt")]
        _claim_outputs(args, files)
        counts, cells, genes = simulate_cells(*shape, **kw)
        with _replacing(*files) as (tmp_counts, tmp_cells, tmp_genes):
            sparse.save_npz(tmp_counts, counts)
            cells.to_csv(tmp_cells, sep="\t")
            tmp_genes.write_text("\n".join(genes) + "\n")
        n_cells = counts.shape[0]
    else:
        raise UserError(f"-o {args.output}: use .h5ad (AnnData) or .npz (sparse counts).")
    _say(args, f"wrote {out}: {n_cells} cells x {args.n_genes} genes, {args.n_donors} donors, "
         f"{args.n_celltypes} cell types.")  # fmt: skip


def _read_numbers(path: str | None, what: str, ndim: int) -> np.ndarray | None:
    """A .npy array or a whitespace-separated number table (data._loadtxt)."""
    from .data import _loadtxt

    if path is None:
        return None
    p = _existing(path, what)
    if not _is(p, ".npy"):
        return _loadtxt(p, what, ndim)
    try:
        with open(p, "rb") as handle:
            return np.load(handle, allow_pickle=False)
    except NPZ_ERRORS as err:
        raise UserError(f"{what}: {p}: not a .npy array, or truncated or damaged "
                        f"({type(err).__name__}: {err}).") from None  # fmt: skip


class GxEData(NamedTuple):
    """What `gxemm` fits, matched: y (T, N), X (N, q) or None, K (N, N), Z (N, K0) or None with
    its level names; trait names and the index's name; the input files by role (for their
    sha256) and the sidecar's record of how they were read."""

    y: np.ndarray
    X: np.ndarray | None
    K: np.ndarray
    Z: np.ndarray | None
    levels: list[str]
    traits: list[str]
    index_name: str
    files: dict[str, str | None]
    record: dict


def _gxemm_named(args) -> bool:
    """Inputs matched by donor id (--bfile or --donors), or the original's number files."""
    return args.bfile is not None or args.donors is not None


def _check_gxemm_options(args) -> None:
    """gxemm's option mistakes, before anything is read."""
    named = _gxemm_named(args)
    if (args.bfile is None) == (args.K is None):
        raise UserError("give exactly one of --bfile (PLINK genotypes: K = their GRM) and --K "
                        "(a kinship matrix).")  # fmt: skip
    if args.bfile is None and (args.maf is not None or args.max_missing is not None):
        raise UserError("--maf, --max-missing: filters of --bfile's variants; drop them with --K.")
    if args.donors is None:
        for flag in ("donor_col", "covars", "env"):
            if getattr(args, flag) is not None:
                raise UserError(f"--{flag.replace('_', '-')}: a column of --donors; give the "
                                "donor table.")  # fmt: skip
    if named and (args.Z is not None or args.X is not None):
        raise UserError("--Z, --X: the original's number files, in donor order; with --bfile or "
                        "--donors, give --env and --covars (columns of --donors).")  # fmt: skip
    changed = [f for f, on in (("--normalize", args.normalize != "none"),
                               ("--min-expressed", args.min_expressed != 0),
                               ("--y-format", args.y_format != "auto"),
                               ("--intersect", args.intersect)) if on]  # fmt: skip
    if changed and not named:
        raise UserError(f"{', '.join(changed)}: for an expression table matched by donor id, "
                        "with --bfile or --donors.")  # fmt: skip
    if not 0 <= args.min_expressed <= 1:
        raise UserError("--min-expressed: a share of the donors, in [0, 1] (e.g. 0.9).")
    has_env = args.env is not None if named else args.Z is not None
    if not has_env and (args.gtype != "hom" or args.etype != "hom"):
        give = "--env (a column of --donors)" if named else "--Z"
        raise UserError(f"--gtype {args.gtype} --etype {args.etype}: needs environments; give "
                        f"{give}, or fit --gtype hom --etype hom.")  # fmt: skip
    if args.lrt and args.gtype == "hom":
        raise UserError("--lrt: tests --gtype iid or free against hom; with --gtype hom there "
                        "is nothing to test.")  # fmt: skip
    if args.lrt and args.method != "reml":
        raise UserError("--lrt: needs --method reml (HE has no likelihood).")
    if args.nonneg and args.method != "reml":
        raise UserError("--nonneg: constrains the REML fit; drop it with --method he.")
    for flag in ("chunk_size", "max_iter"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise UserError(f"--{flag.replace('_', '-')}: must be >= 1.")
    if not args.tol > 0:
        raise UserError("--tol: must be > 0.")


def _gxemm_numbers(args) -> GxEData:
    """The original's files: numbers in donor order (--y, --K, --Z, --X)."""
    y = _read_numbers(args.y, "--y", 1)
    y = y.T if y.ndim == 2 else y[None]  # traits as rows
    K, Z = _read_numbers(args.K, "--K", 2), _read_numbers(args.Z, "--Z", 2)
    X = _read_numbers(args.X, "--X", 2)
    added = []
    if Z is not None and not args.no_env_effects:
        from .gxemm import model  # imports JAX: after reading the inputs

        added = model.env_main_effects(X, Z)
        X = np.hstack([np.empty((len(Z), 0)) if X is None else X, Z[:, added]])
    levels = [] if Z is None else [f"env{k + 1}" for k in range(Z.shape[1])]
    record = {"y": args.y, "K": args.K, "Z": args.Z, "X": args.X, "env_levels": levels,
              "env_effects": [f"Z column {k + 1}" for k in added]}  # fmt: skip
    files = {"y": args.y, "K": args.K, "Z": args.Z, "X": args.X}
    traits = [f"trait{t}" for t in range(y.shape[0])]
    return GxEData(y, X, K, Z, levels, traits, "trait", files, record)


def _bfile_files(prefix: str) -> dict[str, str]:
    stem = prefix[:-4] if prefix.endswith(".bed") else prefix
    return {f"bfile{ext}": f"{stem}{ext}" for ext in (".bed", ".bim", ".fam")}


def _gxemm_tables(args) -> GxEData:
    """Expression, donor table and genotypes (or a kinship table), matched by donor id."""
    from .gxemm import model, plink, tables  # imports JAX (the package): no compilation

    table, covars = None, []
    if args.donors is not None:
        table = tables.read_donor_table(_existing(args.donors, "--donors"),
                                        donor_col=args.donor_col)  # fmt: skip
        if args.covars is not None:
            covars = [c.strip() for c in args.covars.split(",") if c.strip()]
            if not covars:
                raise UserError("--covars: no column names given.")
        for option, column in [("--covars", c) for c in covars] + [("--env", args.env)]:
            if column is not None and column not in table:
                raise UserError(f"{option}: no column {column!r} in {args.donors} (its "
                                f"columns: {', '.join(table.columns)}).")  # fmt: skip
    if args.bfile is not None:
        geno_ids, geno_name, kinship = plink.fam_ids(args.bfile), f"{args.bfile}.fam", None
    else:
        kinship = tables.read_kinship(_existing(args.K, "--K"))
        geno_ids, geno_name = list(kinship.index), "--K"
    known = set(geno_ids) | (set() if table is None else set(table.index))
    expr = tables.read_expression(_existing(args.y, "--y"), known, fmt=args.y_format)
    donors, left_out = tables.match_donors(
        list(expr.values.columns), table_ids=None if table is None else list(table.index),
        genotype_ids=geno_ids, intersect=args.intersect, names=("--y", "--donors", geno_name),
    )  # fmt: skip
    if args.intersect:
        print(f"ctmm-jax gxemm: --intersect: using the {len(donors)} donors in all inputs; "
              + ", ".join(f"{n} of {name} left out" for name, n in left_out.items()) + ".",
              file=sys.stderr)  # fmt: skip
    values = expr.values[donors]
    bad = values.isna().to_numpy()
    if bad.any():
        g, d = np.argwhere(bad)[0]
        raise UserError(f"--y: {int(bad.sum())} values are empty or not numbers (e.g. gene "
                        f"{values.index[g]!r}, donor {values.columns[d]!r}); GxEMM needs every "
                        "donor's value.")  # fmt: skip
    y = values.to_numpy(np.float64)
    n_genes = len(y)
    expressed = (y > 0).mean(1) >= args.min_expressed
    if args.normalize == "logcpm":
        y = tables.logcpm(y)  # totals over every gene of the file
    if not expressed.any():
        raise UserError(f"--min-expressed {args.min_expressed}: none of the {n_genes} genes has "
                        "a value > 0 in that share of the donors.")  # fmt: skip
    y, traits = y[expressed], [str(g) for g in values.index[expressed]]
    rows = None if table is None else table.loc[donors]
    X = None if not covars else tables.covariates(rows, covars)
    Z, levels = None, []
    if args.env is not None:
        Z, levels = tables.environments(rows[args.env], what=f"--env {args.env}")
    added = []
    if Z is not None and not args.no_env_effects:
        added = model.env_main_effects(X, Z)
        X = np.hstack([np.empty((len(Z), 0)) if X is None else X, Z[:, added]])
    record = {}
    if args.bfile is not None:
        maf = 0.01 if args.maf is None else args.maf
        max_missing = 0.05 if args.max_missing is None else args.max_missing
        grm = plink.grm(args.bfile, ids=donors, maf=maf, max_missing=max_missing)
        K = grm.K
        record = {"maf": maf, "max_missing": max_missing, "n_variants": grm.n_variants}
    else:
        K = kinship.loc[donors, donors].to_numpy(np.float64)
    files = {"y": args.y, "donors": args.donors,
             **(_bfile_files(args.bfile) if args.bfile else {"K": args.K})}  # fmt: skip
    record = {
        "y": args.y, "y_format": expr.fmt, "y_layout": expr.layout, "bfile": args.bfile,
        "K": args.K, "donors": args.donors, "donor_col": args.donor_col, "covars": covars,
        "env": args.env, "env_levels": levels,
        "env_effects": [f"{args.env}={levels[k]}" for k in added],
        "intersect": args.intersect, "left_out": left_out if args.intersect else {},
        "normalize": args.normalize, "min_expressed": args.min_expressed,
        "n_genes_in_y": n_genes, **record,
        "donors_used": {"n": len(donors), "sha256": fingerprint(donors)},
    }  # fmt: skip
    return GxEData(y, X, K, Z, levels, traits, "gene", files, record)


def run_gxemm(args) -> None:
    out = _check_output(args.output)
    _check_gxemm_options(args)
    _claim_outputs(args, _table_files(out))
    _use_cache(args.cache)
    data = _gxemm_tables(args) if _gxemm_named(args) else _gxemm_numbers(args)
    inputs = _input_sha256(data.files)
    lrt = args.lrt if args.lrt is not None else args.gtype != "hom" and args.method == "reml"
    from .gxemm import fit, model  # imports JAX: after reading the inputs
    from .results import column_dictionary

    model.table_names(args.gtype, args.etype, data.levels)  # before the fits, not after

    options = dict(gtype=args.gtype, etype=args.etype, method=args.method, nonneg=args.nonneg,
                   chunk_size=args.chunk_size, max_iter=args.max_iter, tol=args.tol)  # fmt: skip
    T, N = data.y.shape
    _say(args, f"fitting {T} traits x {N} donors (gtype {args.gtype}, etype {args.etype}"
         f"{', and gtype hom for the LRT' if lrt else ''}) ...")  # fmt: skip
    start = time.perf_counter()
    with warnings.catch_warnings():  # said below in one line, with the environments' names
        warnings.simplefilter("ignore", model.IdentifiabilityWarning)
        result = fit(data.y, data.X, data.K, data.Z, **options)
        hom = fit(data.y, data.X, data.K, data.Z, **{**options, "gtype": "hom"}) if lrt else None
    weak = model.weak_gxe(result.kernel_vif, args.gtype, args.etype, data.levels)
    if weak:
        print(f"ctmm-jax gxemm: warning: {model.gxe_vif_message(weak)}", file=sys.stderr)
    names = model.component_names(args.gtype, args.etype, data.levels)
    vif = {n: float(v) if np.isfinite(v) else "inf"
           for n, v in zip(names, result.kernel_vif, strict=True)}  # fmt: skip
    table = result.named_table(data.levels, hom=hom)
    table = table.set_axis(pd.Index(data.traits, name=data.index_name))
    meanings = column_dictionary(table.columns).set_index("column")["meaning"]
    settings = {"command": "gxemm", **data.record, "input_sha256": inputs, **options,
                "lrt": lrt, "env_main_effects": not args.no_env_effects, "df": int(result.df),
                "kernel_vif": vif, "weakly_identified": list(weak),
                "n_traits": T, "n_donors": N, "n_converged": int(table["converged"].sum()),
                "tests": {c: meanings[c] for c in table.columns if c.startswith("p_")},
                "seconds": round(time.perf_counter() - start, 3),
                "environment": _jax_setup()}  # fmt: skip
    _write_table(table, out, settings)
    _say(args, f"wrote {out}: {T} traits ({settings['n_converged']} converged) in "
         f"{settings['seconds']:.1f} s.")  # fmt: skip


# --------------------------------------------------------------------------------- workflow


def run_workflow_init(args) -> None:
    from .workflow import TEMPLATES, template

    folder = Path(args.directory)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{folder}: is a file, not a folder; give the folder to write to.")
    files = [folder / name for name in TEMPLATES]
    _claim_outputs(args, files)
    with _replacing(*files) as temporary:
        for name, tmp in zip(TEMPLATES, temporary, strict=True):
            tmp.write_text(template(name), encoding="utf-8")
    snakefile, config = (shlex.quote(str(f)) for f in files)
    _say(args, f"wrote {snakefile} and {config}. Set the input (cells) and the models in "
         f"{config}, then run:\n  snakemake -s {snakefile} -d {shlex.quote(str(folder))} "
         "--cores 2")  # fmt: skip


def _read_celltypes(path: str) -> tuple[str, ...]:
    """The cell types of a pseudobulk dataset, read alone (the arrays may not fit in memory)."""
    from .preprocess import DATASET_FORMAT

    p = _existing(path, "--dataset")
    not_ours = UserError(f"--dataset: {p} is not a pseudobulk dataset (make one with `ctmm-jax "
                         "pseudobulk`).")  # fmt: skip
    try:
        with open(p, "rb") as handle:
            if handle.read(4) != b"PK\x03\x04":  # every .npz is a zip archive
                raise not_ours
            handle.seek(0)
            with np.load(handle, allow_pickle=False) as f:
                if "format" not in f.files or str(f["format"]) != DATASET_FORMAT:
                    raise not_ours
                key = "celltypes" if "celltypes" in f.files else "cell_types"
                return tuple(str(c) for c in f[key])
    except NPZ_ERRORS as err:
        raise UserError(f"--dataset: {p}: not a pseudobulk dataset, or truncated or damaged "
                        f"({type(err).__name__}: {err}).") from None  # fmt: skip


def _check_dataset(dataset: str, fits: dict[str, dict]) -> str:
    """The dataset's sha256, checked to be the content the fits read."""
    digest = sha256_file(_existing(dataset, "--dataset"))
    for name, meta in fits.items():
        if meta["input_sha256"].get("dataset") != digest:
            raise UserError(f"--dataset: {dataset} is not the dataset the {name} fit read (its "
                            "content differs); pass that one.")  # fmt: skip
    return digest


def run_workflow_table(args) -> None:
    out = _check_output(args.output)
    _claim_outputs(args, _table_files(out))
    paths: dict[str, str] = {}
    for spec in args.fits:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise UserError(f"{spec!r}: write MODEL=TABLE, e.g. free=results/free.tsv.")
        if name in paths:
            raise UserError(f"{name}: given twice ({paths[name]}, {path}).")
        paths[name] = path
    parts = {name: _read_part(path) for name, path in paths.items()}  # checked as merge does
    for part in parts.values():
        if part.chunk is not None:
            raise UserError(f"{part.path}: chunk {part.meta['chunk']} of a fit; give the "
                            "merged table (`ctmm-jax merge`).")  # fmt: skip
    celltypes = _read_celltypes(args.dataset)
    digest = _check_dataset(args.dataset, {n: p.meta for n, p in parts.items()})
    from .workflow import report  # imports JAX (models): after the quick checks

    table, dictionary, lrt = report.combine({n: p.table for n, p in parts.items()},
                                            {n: p.meta for n, p in parts.items()},
                                            len(celltypes), main=args.main)  # fmt: skip
    main = args.main or next(iter(parts))
    settings = {"command": "workflow table", "tables": paths, "dataset": args.dataset,
                "input_sha256": {**_input_sha256(paths), "dataset": digest},
                "main": main, "models": list(parts), "lrt": lrt,
                "fits": {n: _shared_settings(p.meta) for n, p in parts.items()},
                "n_genes": len(table)}  # fmt: skip
    _write_table(table, out, settings, dictionary)
    _say(args, f"wrote {out}: {len(table)} genes, models {', '.join(parts)}"
         + (f", LRT of {main} against {lrt['null']}." if lrt else "."))  # fmt: skip


def _pyplot():
    """matplotlib's pyplot drawing to files (Agg), or None when matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def run_workflow_report(args) -> None:
    from . import __version__

    folder = Path(args.output)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"-o {folder}: is a file; give the report folder.")
    table_path = _existing(args.table, "table")
    sidecar = Path(f"{table_path}.json")
    if not sidecar.is_file():
        raise UserError(f"{table_path}: no sidecar {sidecar.name}; give the output of "
                        "`ctmm-jax workflow table`.")  # fmt: skip
    meta = _read_sidecar(sidecar)
    if meta.get("command") != "workflow table":
        raise UserError(f"{table_path}: not an output of `ctmm-jax workflow table` "
                        f"({sidecar.name} says command {meta.get('command')!r}).")  # fmt: skip
    if sha256_file(table_path) != (meta.get("table") or {}).get("sha256"):
        raise UserError(f"{table_path}: its content does not match the sha256 in "
                        f"{sidecar.name}; run `workflow table` again.")  # fmt: skip
    partition = not args.no_variance_partition
    if partition and args.dataset is None:
        raise UserError("--dataset: give the dataset (for the variance partition), or pass "
                        "--no-variance-partition.")  # fmt: skip
    plt = _pyplot()
    names = {"qq": "qq.png", "vp_table": "variance_partition.tsv",
             "vp_plot": "variance_partition.png", "summary": "summary.json"}  # fmt: skip
    planned = ["qq"] if plt else []
    planned += (["vp_table"] + (["vp_plot"] if plt else [])) if partition else []
    _claim_outputs(args, [folder / names[k] for k in [*planned, "summary"]])
    table = _read_table(table_path, "table", labels=[0], index=True)
    main, models = meta["main"], meta["models"]
    fit = meta["fits"][main]
    from . import plot
    from .workflow import report

    notes = []
    if plt is None:
        notes.append('no plots: matplotlib is not installed (pip install "ctmm_jax[plot]")')
    figures, vp = {}, None
    series = report.qq_series(table, main)
    if plt and series:
        figures["qq"] = plot.qq(series).figure
        figures["qq"].axes[0].set_title(f"{main} {fit['method'].upper()}: {len(table)} genes")
    elif plt:
        planned.remove("qq")
        notes.append(f"no QQ plot: the {main} fits have no p values")
    if partition:
        from .preprocess import Pseudobulk

        _check_dataset(args.dataset, {main: fit})
        try:
            pb = Pseudobulk.load(_existing(args.dataset, "--dataset"))
        except ValueError as err:
            raise UserError(str(err)) from None
        data = report.fitted_data(pb, [str(g) for g in table.index], fit)
        vp = report.variance_partition(table, main, data)
        if plt and vp.filter(like="frac_").notna().all(axis=1).any():
            title = f"{main} {fit['method'].upper()}"
            figures["vp_plot"] = plot.partition_plot(vp, title).figure
        elif plt:
            planned.remove("vp_plot")
            notes.append(f"no variance partition plot: no gene has {main} estimates")
    written = {k: names[k] for k in planned}
    info = {"ctmm_jax_version": __version__, "table": str(table_path), "main": main,
            "models": models, "lrt": meta.get("lrt"), **report.summary(table, models),
            "files": written, "notes": notes}  # fmt: skip
    paths = [folder / names[k] for k in [*planned, "summary"]]
    with _replacing(*paths) as temporary:
        for key, tmp in zip(planned, temporary, strict=False):
            if key == "vp_table":
                vp.to_csv(tmp, sep="\t")
            else:
                figures[key].savefig(tmp, dpi=150)
        temporary[-1].write_text(json.dumps(info, indent=2) + "\n")
    for fig in figures.values():
        plt.close(fig)
    found = {c: n for c, n in info["discoveries"].items() if c in ("q_lrt", f"{main}_q_V")}
    _say(
        args,
        f"wrote {folder}: {', '.join([*written.values(), 'summary.json'])}"
        + "".join(f"; {n} genes with {c} < {info['alpha']}" for c, n in found.items()),
    )


if __name__ == "__main__":
    run()
