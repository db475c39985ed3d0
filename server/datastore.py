"""A small image/label store for the MONAI Label protocol ("upload current volume, then infer by id").

3D Slicer's MONAILabel module uploads the volume it shows (``PUT /datastore/?image=ID``), then asks for inference
by that id, and may submit a corrected label (``PUT /datastore/label?image=ID&tag=final``). Layout under ``root``::

    images/<id>/image<ext>            the uploaded volume (``ext`` one of .nii.gz .nii .nrrd .mha)
    images/<id>/info.json             name, checksum, size, upload time, client params
    images/<id>/labels/<tag><ext>     submitted labels, with ``<tag>.json`` next to each
    tmp/                              uploads being received (moved into place atomically)

Ids come from the network, so they are checked before they touch a path: no separators, no ``..``, no control
characters, no leading dot, at most 128 characters. Replacing an image or label is atomic (``os.replace``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from server.errors import ApiError

logger = logging.getLogger("server")

#: Suffixes the datastore keeps (single-file volumes; ``.nhdr``/``.mhd`` would need a second, detached file).
STORE_SUFFIXES: tuple[str, ...] = (".nii.gz", ".nii", ".nrrd", ".mha")
MAX_ID_LENGTH = 128
FINAL_TAG = "final"


def check_id(value: str | None, what: str = "image") -> str:
    """Return ``value`` if it is a safe datastore id, else raise a 400 ``ApiError``.

    Args:
        value: the id from the query string.
        what: the parameter name, for the message (``image``, ``tag``, ``label``).
    """
    if value is None or value == "":
        raise ApiError(400, "BadId", f"no {what} id given", hint=f"pass ?{what}=<id>")
    problem = None
    if len(value) > MAX_ID_LENGTH:
        problem = f"is {len(value)} characters long (at most {MAX_ID_LENGTH})"
    elif "/" in value or "\\" in value:
        problem = "contains a path separator"
    elif ".." in value:
        problem = "contains '..'"
    elif value.startswith("."):
        problem = "starts with '.'"
    elif any(ord(c) < 32 or ord(c) == 127 for c in value):
        problem = "contains a control character"
    elif value != value.strip():
        problem = "has leading or trailing spaces"
    if problem:
        raise ApiError(
            400,
            "BadId",
            f"{what} id {value[:40]!r} {problem}",
            hint="use letters, digits, spaces, '-', '_' and single dots; no '/', '\\', '..' or control characters",
        )
    return value


def store_suffix(filename: str | None) -> str | None:
    """The stored suffix of an uploaded file name (a full local path is fine), or ``None`` if unsupported."""
    name = (filename or "").replace("\\", "/").rsplit("/", 1)[-1].lower()
    return next((s for s in STORE_SUFFIXES if name.endswith(s) and len(name) > len(s)), None)


class Datastore:
    """Images and labels on disk, keyed by checked ids; safe to share between request threads.

    Args:
        root: the store's folder (created on first use), e.g. ``settings.data_dir / "datastore"``.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._lock = threading.Lock()

    @property
    def images_dir(self) -> Path:
        return self.root / "images"

    def tmp_path(self, suffix: str) -> Path:
        """A fresh path under ``root/tmp`` for receiving an upload."""
        tmp = self.root / "tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        return tmp / f"{uuid.uuid4().hex}{suffix}"

    # ---- images -------------------------------------------------------------------------------------------
    def _folder(self, image_id: str) -> Path:
        return self.images_dir / check_id(image_id)

    def add_image(self, image_id: str, src: Path, suffix: str, info: dict[str, Any]) -> None:
        """Move ``src`` into the store as image ``image_id`` (replacing an earlier one and its labels)."""
        folder = self._folder(image_id)
        with self._lock:
            if folder.exists():
                shutil.rmtree(folder)
            folder.mkdir(parents=True)
            os.replace(src, folder / f"image{suffix}")
            _write_json(folder / "info.json", {**info, "ext": suffix, "ts": int(time.time())})
        logger.info("datastore: stored image %s", image_id)

    def image_path(self, image_id: str) -> Path:
        """The stored file of ``image_id``, or a 404."""
        path = self._find(self._folder(image_id), "image")
        if path is None:
            raise ApiError(
                404, "NotFound", f"no image {image_id!r} in the datastore", hint="upload it with PUT /datastore/?image="
            )
        return path

    # ---- labels -------------------------------------------------------------------------------------------
    def save_label(self, image_id: str, tag: str, src: Path, suffix: str, info: dict[str, Any]) -> None:
        """Move ``src`` into the store as label ``tag`` of ``image_id`` (which must exist)."""
        self.image_path(image_id)
        labels = self._folder(image_id) / "labels"
        tag = check_id(tag, "tag")
        with self._lock:
            labels.mkdir(exist_ok=True)
            old = self._find(labels, tag)
            os.replace(src, labels / f"{tag}{suffix}")
            if old is not None and old.name != f"{tag}{suffix}":
                old.unlink(missing_ok=True)
            _write_json(labels / f"{tag}.json", {**info, "ext": suffix, "ts": int(time.time())})
        logger.info("datastore: stored label %s/%s", image_id, tag)

    def label_path(self, image_id: str, tag: str = FINAL_TAG) -> Path:
        """The stored label ``tag`` of ``image_id``, or a 404."""
        path = self._find(self._folder(image_id) / "labels", check_id(tag, "tag"))
        if path is None:
            raise ApiError(404, "NotFound", f"no label {tag!r} for image {image_id!r} in the datastore")
        return path

    # ---- listings -----------------------------------------------------------------------------------------
    def ids(self) -> list[str]:
        """Ids of all stored images, sorted."""
        if not self.images_dir.is_dir():
            return []
        return sorted(p.name for p in self.images_dir.iterdir() if self._find(p, "image") is not None)

    def stats(self) -> dict[str, int]:
        """``{total, completed}``: stored images and those with a ``final`` label."""
        ids = self.ids()
        done = sum(self._find(self.images_dir / i / "labels", FINAL_TAG) is not None for i in ids)
        return {"total": len(ids), "completed": done}

    def to_json(self) -> dict[str, Any]:
        """Everything, in the shape MONAI Label clients read (``objects[id].image`` / ``.labels[tag]``)."""
        objects: dict[str, Any] = {}
        for image_id in self.ids():
            folder = self.images_dir / image_id
            image = self._find(folder, "image")
            labels: dict[str, Any] = {}
            if (folder / "labels").is_dir():
                for meta in sorted((folder / "labels").glob("*.json")):
                    labels[meta.stem] = _entry(meta)
            objects[image_id] = {"image": _entry(folder / "info.json", image), "labels": labels}
        return {"name": "medseg", "description": "medseg MONAI Label datastore", "objects": objects, **self.stats()}

    @staticmethod
    def _find(folder: Path, stem: str) -> Path | None:
        for suffix in STORE_SUFFIXES:
            path = folder / f"{stem}{suffix}"
            if path.is_file():
                return path
        return None


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)


def _entry(meta: Path, image: Path | None = None) -> dict[str, Any]:
    try:
        info = json.loads(meta.read_text())
    except (OSError, ValueError):
        info = {}
    return {"ext": info.pop("ext", image.name[len("image") :] if image else ""), "info": info}
