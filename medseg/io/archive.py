"""Safe extraction of zip archives (uploaded DICOM series).

Archives come from users and from the network, so extraction refuses path traversal ("zip slip": absolute names,
``..`` components), symbolic links, too many members, and members or totals over a size budget. Declared sizes
are checked first, and the bytes actually written are counted as well, because a crafted archive can lie about
its sizes (zip bomb).
"""

from __future__ import annotations

import logging
import re
import shutil
import stat
import tempfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from medseg.core.errors import DataError

logger = logging.getLogger(__name__)

__all__ = ["ZipLimits", "safe_extract_zip"]

_GIB = 1024**3
_CHUNK = 1024 * 1024
_DRIVE = re.compile(r"^[A-Za-z]:")


@dataclass(frozen=True)
class ZipLimits:
    """Budget for extracting one archive.

    Args:
        max_members: most entries (files and folders) an archive may hold.
        max_total_bytes: most uncompressed bytes over all members.
        max_member_bytes: most uncompressed bytes of one member.
    """

    max_members: int = 10_000
    max_total_bytes: int = 4 * _GIB
    max_member_bytes: int = 1 * _GIB


def _member_target(info: zipfile.ZipInfo, root: Path, archive: Path) -> Path:
    """Resolve a member's destination under ``root``, refusing traversal and links."""
    name = info.filename
    # Zip names use "/"; some Windows tools write "\" - treat both as separators.
    posix = name.replace("\\", "/")
    parts = PurePosixPath(posix).parts
    if posix.startswith("/") or _DRIVE.match(posix):
        raise DataError(
            f"{archive.name} member {name!r} has an absolute path",
            expected="relative member names",
            hint="re-create the archive from inside the folder",
            path=archive,
        )
    if ".." in parts:
        raise DataError(
            f"{archive.name} member {name!r} contains '..'",
            expected="member names that stay inside the archive folder",
            hint="re-create the archive without parent-directory references",
            path=archive,
        )
    mode = info.external_attr >> 16
    if stat.S_ISLNK(mode):
        raise DataError(
            f"{archive.name} member {name!r} is a symbolic link",
            expected="regular files and folders only",
            hint="archive the files themselves, not links to them",
            path=archive,
        )
    target = (root / Path(*[p for p in parts if p not in ("", ".")])).resolve()
    if target != root and root not in target.parents:
        raise DataError(f"{archive.name} member {name!r} escapes the extraction folder", path=archive)
    return target


def _check_declared(infos: list[zipfile.ZipInfo], archive: Path, limits: ZipLimits) -> None:
    if len(infos) > limits.max_members:
        raise DataError(
            f"{archive.name} has {len(infos)} members",
            expected=f"at most {limits.max_members}",
            hint="split the upload or raise ZipLimits.max_members",
            path=archive,
        )
    total = 0
    for info in infos:
        if info.file_size > limits.max_member_bytes:
            raise DataError(
                f"{archive.name} member {info.filename!r} declares {info.file_size} bytes",
                expected=f"at most {limits.max_member_bytes} bytes per member",
                path=archive,
            )
        if info.flag_bits & 0x1:
            raise DataError(
                f"{archive.name} member {info.filename!r} is encrypted",
                expected="an unencrypted archive",
                path=archive,
            )
        total += info.file_size
    if total > limits.max_total_bytes:
        raise DataError(
            f"{archive.name} declares {total} uncompressed bytes",
            expected=f"at most {limits.max_total_bytes} bytes in total",
            path=archive,
        )


def _extract_all(
    zf: zipfile.ZipFile, infos: list[zipfile.ZipInfo], root: Path, archive: Path, limits: ZipLimits
) -> None:
    written_total = 0
    for info in infos:
        target = _member_target(info, root, archive)
        if info.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        written = 0
        with zf.open(info) as src, open(target, "wb") as dst:
            while chunk := src.read(_CHUNK):
                written += len(chunk)
                written_total += len(chunk)
                if written > limits.max_member_bytes or written_total > limits.max_total_bytes:
                    raise DataError(
                        f"{archive.name} member {info.filename!r} expands beyond the size limit "
                        f"({written} bytes written, {written_total} in total)",
                        expected=f"at most {limits.max_member_bytes} bytes per member and "
                        f"{limits.max_total_bytes} in total",
                        hint="the archive's declared sizes are wrong (possible zip bomb)",
                        path=archive,
                    )
                dst.write(chunk)


def safe_extract_zip(path: str | Path, dest: str | Path | None = None, limits: ZipLimits | None = None) -> Path:
    """Extract a zip archive into a fresh temporary folder, refusing unsafe content.

    Args:
        path: the ``.zip`` file.
        dest: folder in which the temporary extraction folder is created (system temp folder if None); the caller
            owns it and removes it when done (e.g. a ``tempfile.TemporaryDirectory``).
        limits: size and member budget; ``ZipLimits()`` defaults if None.

    Returns:
        The new folder (inside ``dest``) holding the extracted members.

    Raises:
        DataError: the archive is missing or corrupt, or a member has an absolute name, a ``..`` component, is a
            symbolic link or is encrypted, or the member count or sizes (declared or actual) exceed ``limits``.
            Nothing is left behind on failure.
    """
    archive = Path(path)
    limits = limits or ZipLimits()
    if not archive.is_file():
        raise DataError(f"archive {archive} not found", expected="an existing .zip file", path=archive)
    if dest is not None:
        Path(dest).mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="medseg-unzip-", dir=None if dest is None else str(dest))).resolve()
    try:
        with zipfile.ZipFile(archive) as zf:
            infos = zf.infolist()
            _check_declared(infos, archive, limits)
            _extract_all(zf, infos, root, archive, limits)
    except DataError:
        shutil.rmtree(root, ignore_errors=True)
        raise
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError, ValueError, OSError) as exc:
        shutil.rmtree(root, ignore_errors=True)
        raise DataError(
            f"{archive.name} is not a readable zip archive ({type(exc).__name__}: {exc})",
            expected="a valid .zip file",
            hint="re-create the archive; check the upload was not truncated",
            path=archive,
        ) from exc
    logger.debug("extracted %d members of %s into %s", len(infos), archive, root)
    return root
