"""Build the malformed-file corpus: ``python -m tests.corpus.malformed OUT_DIR`` writes it and lists every case.

Each builder writes its files under ``OUT_DIR/<format>/`` and returns :class:`~tests.corpus.base.Case` records:
NIfTI, NRRD and MetaImage header lies (:mod:`tests.corpus.volumes`), DICOM files, series and zips
(:mod:`tests.corpus.dicom_zip`), and PNG/JPEG/TIFF/BMP files (:mod:`tests.corpus.raster`). A few valid files are
included so that a test over the corpus can fail both ways.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tests.corpus import dicom_zip, raster, volumes
from tests.corpus.base import Case

__all__ = ["Case", "build_corpus"]


def build_corpus(root: str | Path) -> list[Case]:
    """Write every corpus file under ``root`` (created if missing) and return the cases, names unique."""
    out = Path(root)
    out.mkdir(parents=True, exist_ok=True)
    cases: list[Case] = []
    for builder in (*volumes.BUILDERS, *dicom_zip.BUILDERS, *raster.BUILDERS):
        cases += builder(out)
    names = [c.name for c in cases]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"duplicate corpus case names: {duplicates}")
    return cases


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="folder to write the corpus into (must not exist)")
    args = parser.parse_args(argv)
    if args.out.exists():
        parser.error(f"{args.out} exists; pass a new folder")
    cases = build_corpus(args.out)
    for case in cases:
        kind = "valid" if case.valid else "malformed"
        options = f" {case.options}" if case.options else ""
        print(f"{kind:9s} {case.name:55s} {case.path.relative_to(args.out)}{options}")
    print(f"{len(cases)} cases ({sum(c.valid for c in cases)} valid)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
