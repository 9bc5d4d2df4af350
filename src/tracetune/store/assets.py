"""Content-addressed storage of images and files inside a dataset directory."""

from __future__ import annotations

import collections.abc
import enum
import functools
import hashlib
import io
import mimetypes
import os
import shutil
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from PIL import Image
from pydantic import BaseModel

from tracetune.errors import InputFileError
from tracetune.inputs import ImageInfo, check_image
from tracetune.schema import FileRef


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def guess_mime(name: str) -> str:
    mime, _ = mimetypes.guess_type(name)
    return mime or "application/octet-stream"


class AssetStore:
    """The ``assets/`` folder of a dataset: bytes stored once under their SHA-256."""

    def __init__(self, dataset_root: str | os.PathLike[str]) -> None:
        self.root = Path(dataset_root)

    def path(self, ref: FileRef) -> Path:
        """Local path of ``ref``'s bytes; raises if this dataset does not hold them."""
        path = self.root / ref.asset_path
        if not path.exists():
            raise FileNotFoundError(
                f"asset {ref.name!r} ({ref.sha256[:12]}) is missing from {self.root / 'assets'}; "
                "was the dataset copied without its assets/ folder?"
            )
        return path

    def has(self, ref: FileRef) -> bool:
        return (self.root / ref.asset_path).exists()

    def put_bytes(
        self,
        data: bytes,
        name: str,
        mime: str | None = None,
        description: str | None = None,
        *,
        where: str | None = None,
        checked: ImageInfo | None = None,
    ) -> FileRef:
        """Store ``data`` as ``name``. An image is checked first (a decompression bomb, a
        truncated or corrupt image raises :class:`tracetune.inputs.ImageError` naming
        ``where``, else ``name``), so nothing downstream meets a broken one; pass the
        :class:`~tracetune.inputs.ImageInfo` of an image already checked as ``checked``."""
        mime = mime or guess_mime(name)
        width = height = None
        if mime.startswith("image/"):
            info = checked or check_image(data, where or name)
            width, height = info.width, info.height
        ref = FileRef(
            sha256=sha256_bytes(data),
            name=name,
            mime=mime,
            size=len(data),
            width=width,
            height=height,
            description=description,
        )
        target = self.root / ref.asset_path
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(target.name + f".tmp{os.getpid()}")
            tmp.write_bytes(data)
            os.replace(tmp, target)
        return ref

    def put_file(
        self, path: str | os.PathLike[str], name: str | None = None, description: str | None = None
    ) -> FileRef:
        path = Path(path)
        if not path.is_file():
            raise InputFileError(f"no such file: {path}")
        return self.put_bytes(
            path.read_bytes(), name or path.name, description=description, where=str(path)
        )

    def put_image(self, image: Image.Image, name: str, description: str | None = None) -> FileRef:
        """Store a PIL image; PNG unless ``name`` ends in .jpg/.jpeg/.webp."""
        fmt = {"jpg": "JPEG", "jpeg": "JPEG", "webp": "WEBP"}.get(
            name.rsplit(".", 1)[-1].lower(), "PNG"
        )
        if fmt == "PNG" and not name.lower().endswith(".png"):
            name = f"{name}.png"
        buf = io.BytesIO()
        img = image.convert("RGB") if fmt == "JPEG" and image.mode not in ("RGB", "L") else image
        img.save(buf, format=fmt)
        return self.put_bytes(buf.getvalue(), name, description=description)

    def read_bytes(self, ref: FileRef) -> bytes:
        return self.path(ref).read_bytes()

    def open_image(self, ref: FileRef) -> Image.Image:
        with Image.open(self.path(ref)) as img:
            img.load()
            return img

    def import_from(self, other: AssetStore, ref: FileRef) -> None:
        """Make ``ref`` available here, hard-linking from ``other`` when possible."""
        target = self.root / ref.asset_path
        if target.exists():
            return
        source = other.path(ref)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + f".tmp{os.getpid()}")
        try:
            os.link(source, tmp)
        except OSError:
            shutil.copyfile(source, tmp)
        os.replace(tmp, target)


def iter_file_refs(obj: Any) -> Iterator[FileRef]:
    """Every ``FileRef`` inside a record, however deeply nested."""
    if isinstance(obj, FileRef):
        yield obj
    elif isinstance(obj, BaseModel):
        for name in _fields_with_refs(type(obj)):
            yield from iter_file_refs(getattr(obj, name))
    elif isinstance(obj, list | tuple):
        for item in obj:
            yield from iter_file_refs(item)


@functools.cache
def _fields_with_refs(cls: type[BaseModel]) -> tuple[str, ...]:
    """The fields of ``cls`` whose declared type can hold a ``FileRef`` (a model that can, a
    list or tuple of such, an undeclared type): the others (text, numbers, dicts, models of
    plain values) are never walked, which makes the walk microseconds per record."""
    return tuple(
        name
        for name, info in cls.model_fields.items()
        if _may_hold_refs(info.annotation, frozenset({cls}))
    )


def _may_hold_refs(annotation: Any, seen: frozenset[type]) -> bool:
    if annotation is None or annotation is type(None):
        return False
    if isinstance(annotation, type):
        if issubclass(annotation, FileRef):
            return True
        if issubclass(annotation, BaseModel):
            if annotation in seen:  # a recursive model: its other fields decide
                return False
            inner = seen | {annotation}
            return any(
                _may_hold_refs(f.annotation, inner) for f in annotation.model_fields.values()
            )
        if issubclass(annotation, list | tuple):
            return True  # items of any type
        return not issubclass(annotation, dict | enum.Enum | str | bytes | int | float)
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return False
    if isinstance(origin, type) and issubclass(origin, dict | collections.abc.Mapping):
        return False  # the walk never entered dicts
    args = typing.get_args(annotation)
    if origin is not None and args:  # list[X], tuple[X, ...], unions, Annotated: any member
        return any(_may_hold_refs(a, seen) for a in args if a is not Ellipsis)
    return True  # Any, type variables, forward references: walk them
