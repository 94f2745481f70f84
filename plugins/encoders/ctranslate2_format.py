"""Read a CTranslate2 ``model.bin`` into named PyTorch tensors, without the CTranslate2 runtime.

The file is a small header and a list of named tensors (no pickle, nothing executable): version
(uint32), spec name and revision, then per tensor its name, shape, data type and raw bytes, then
aliases (one tensor under two names, e.g. tied embeddings). Every length is checked against the
file size, so a truncated or foreign file is refused with a clear error instead of a crash.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from emofuse.core import DataError

#: The binary format versions this reader understands (CTranslate2 writes 6 since 3.0).
SUPPORTED_VERSIONS = (5, 6)
#: CTranslate2's DataType enum, in its order.
_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16}
_NAMES = {0: "float32", 1: "int8", 2: "int16", 3: "int32", 4: "float16", 5: "bfloat16"}


@dataclass
class CTranslate2Model:
    """A parsed ``model.bin``: `spec` (e.g. ``WhisperSpec``), its revision, and tensors by name."""

    spec: str
    revision: int
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    def get(self, name: str) -> torch.Tensor:
        try:
            return self.tensors[name]
        except KeyError:
            raise DataError("model.bin", f"has no tensor {name!r} (a {self.spec} revision {self.revision} file)",
                            hint="the file is not the model this reader expects") from None

    def scalar(self, name: str) -> int:
        return int(self.get(name).reshape(-1)[0])


class _Cursor:
    """Bounds-checked little-endian reads over the file's bytes."""

    def __init__(self, data: memoryview, path: Path):
        self.data, self.path, self.pos = data, path, 0

    def take(self, n: int) -> memoryview:
        if n < 0 or self.pos + n > len(self.data):
            raise DataError(self.path, f"truncated or not a CTranslate2 model (needs {n} bytes at offset {self.pos}, "
                                       f"file has {len(self.data)})", hint="reinstall the package that ships it")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: str) -> int:
        return struct.unpack("<" + fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        raw = bytes(self.take(self.unpack("H")))
        if not raw.endswith(b"\0"):
            raise DataError(self.path, f"malformed string at offset {self.pos}", hint="not a CTranslate2 model file")
        return raw[:-1].decode("utf-8", errors="strict")


def read_ctranslate2_model(path: Path | str) -> CTranslate2Model:
    """Parse `path` (a CTranslate2 ``model.bin``); tensors keep the file's data type (float16 stays float16)."""
    path = Path(path)
    try:
        data = memoryview(path.read_bytes())
    except OSError as exc:
        raise DataError(path, f"cannot be read ({exc.strerror or exc})", hint="check the path") from None
    cur = _Cursor(data, path)
    version = cur.unpack("I")
    if version not in SUPPORTED_VERSIONS:
        raise DataError(path, f"CTranslate2 binary version {version} is not supported "
                              f"(this reader knows {', '.join(map(str, SUPPORTED_VERSIONS))})",
                        hint="use a model converted with CTranslate2 3.x or 4.x")
    model = CTranslate2Model(spec=cur.string(), revision=cur.unpack("I"))
    for _ in range(cur.unpack("I")):
        name = cur.string()
        shape = tuple(cur.unpack("I") for _ in range(cur.unpack("B")))
        dtype_id = cur.unpack("B")
        size = cur.unpack("I")
        if dtype_id not in _DTYPES:
            raise DataError(path, f"tensor {name!r} has data type {_NAMES.get(dtype_id, dtype_id)}, "
                                  "which this reader does not support", hint="convert the model to float16 or float32")
        dtype = np.dtype(_DTYPES[dtype_id])
        if size != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
            raise DataError(path, f"tensor {name!r}: {size} bytes do not match shape {shape} of {dtype}",
                            hint="the file is damaged")
        array = np.frombuffer(cur.take(size), dtype=dtype).reshape(shape)
        model.tensors[name] = torch.from_numpy(array.copy())
    for _ in range(cur.unpack("I")):
        alias, target = cur.string(), cur.string()
        model.tensors[alias] = model.get(target)
    if cur.pos != len(data):
        raise DataError(path, f"{len(data) - cur.pos} unexpected bytes after the last tensor", hint="the file is damaged")
    return model
