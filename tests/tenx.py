"""10x Genomics files for the tests (Cell Ranger's matrix folder, features, lists)."""

import gzip
import io

from scipy import sparse
from scipy.io import mmwrite

# 10x v3 features: id, symbol, type; a repeated symbol and an antibody, as Cell Ranger writes
FEATURES = [
    ("ENSG01", "CD3E", "Gene Expression"),
    ("ENSG02", "MT-X", "Gene Expression"),
    ("ENSG03", "MT-X", "Gene Expression"),
    ("ENSG04", "MT-X-1", "Gene Expression"),
    ("CD4_TotalSeqB", "CD4", "Antibody Capture"),
    ("ENSG05", "MS4A1", "Gene Expression"),
]
SYMBOLS = ["CD3E", "MT-X", "MT-X-2", "MT-X-1", "MS4A1"]  # anndata: MT-X-1 is taken, so -2
GENE_IDS = ["ENSG01", "ENSG02", "ENSG03", "ENSG04", "ENSG05"]
GEX = [0, 1, 2, 3, 5]


def write_text(path, lines, gz=False, bom=False):
    text = ("\ufeff" if bom else "") + "".join(f"{line}\n" for line in lines)
    path.write_bytes(gzip.compress(text.encode()) if gz else text.encode())
    return path


def write_10x(folder, X, cells, v3=True):
    """A Cell Ranger matrix folder of X (cells x features): v3 gzipped with features.tsv.gz,
    v2 plain with genes.tsv (id, symbol)."""
    folder.mkdir()
    gz = ".gz" if v3 else ""
    (folder / f"matrix.mtx{gz}").write_bytes(mtx_bytes(X.T, gz=v3))
    if v3:
        write_text(folder / "features.tsv.gz", ["\t".join(f) for f in FEATURES], gz=True)
    else:
        write_text(folder / "genes.tsv", ["\t".join(f[:2]) for f in FEATURES])
    write_text(folder / f"barcodes.tsv{gz}", cells, gz=v3)
    return folder


def mtx_bytes(X, gz=False) -> bytes:
    buf = io.BytesIO()
    mmwrite(buf, sparse.coo_matrix(X))
    return gzip.compress(buf.getvalue()) if gz else buf.getvalue()
