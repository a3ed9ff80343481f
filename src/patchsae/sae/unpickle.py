"""Read torch/pickle checkpoints without executing anything they name.

``read_pickled_checkpoint(path)`` understands the three layouts ``torch.save`` and ``pickle.dump``
produce: the zip archive (``data.pkl`` + ``data/<key>`` storages), the legacy stream (magic number,
protocol, system info, object, storage keys, raw storages) and a plain pickle, optionally gzipped.
The unpickler resolves globals only from an explicit allow-list:

- plain containers (``collections.OrderedDict``, ``set``, ``frozenset``; a
  ``collections.defaultdict(dict)``, as pickled optimiser state holds, becomes a plain ``dict``),
  ``torch.device``, ``torch.Size``, torch dtypes and storage types;
- tensor rebuilding (``torch._utils._rebuild_tensor_v2``, ``_rebuild_tensor``,
  ``_rebuild_parameter``, ``torch.storage._load_from_bytes``), re-implemented here over storages
  read by this module, with bounds checks;
- classes of the modules in ``placeholder_modules``, which become inert placeholders keeping
  their pickled state as a dict (the real class is never imported).

Any other global makes the load fail with ``PickleRefused`` naming it. Pickled state (BUILD)
is only accepted by placeholders and ``OrderedDict`` attributes; any other object refuses it.

Memory stays linear in the file: the bytes read (the plain or decompressed gzip stream, or the
zip members used) may total at most ``max_bytes`` (default ``MAX_CHECKPOINT_BYTES``, 16 GiB),
checked before reading a zip member and chunk by chunk while reading a stream; storages rebuilt
from inside a pickle stream (legacy storages, ``_load_from_bytes``) may together claim at most
as many bytes as that stream holds; the elements that allowed callables copy (the argument of
``set``, ``frozenset``, ``OrderedDict`` and ``torch.Size``, tensor sizes and strides, placeholder
arguments and state) may together number at most as many as that stream has bytes; and
``_codecs.encode`` returns one shared result per distinct string.
"""

from __future__ import annotations

import _compat_pickle
import collections
import functools
import gzip
import io
import pickle
import struct
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO, Any

import torch

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001
MAX_CHECKPOINT_BYTES = 16 * 2**30
MAX_INFLATION = 4.0
INFLATION_FLOOR_BYTES = 2**20
READ_CHUNK_BYTES = 2**20

STORAGE_DTYPES = {
    "FloatStorage": torch.float32,
    "DoubleStorage": torch.float64,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
    "UntypedStorage": torch.uint8,
}
TORCH_DTYPES = {
    name: value for name, value in vars(torch).items() if isinstance(value, torch.dtype)
}


class PickleRefused(ValueError):
    """The pickle names a global outside the allow-list, or is malformed."""


class Placeholder:
    """An inert stand-in for a pickled instance of a class that is never imported.

    ``state`` holds what the pickle handed to BUILD (for a dataclass: its fields), ``args`` the
    constructor arguments of a REDUCE call. Only the unpickler makes them: each class it creates
    carries the ``budget`` that its arguments and state are charged to.
    """

    pickled_module: str = ""
    pickled_name: str = ""
    budget: _Budget

    def __new__(cls, *args: Any) -> Placeholder:
        cls.budget.copy(len(args), f"{cls.pickled_module}.{cls.pickled_name} arguments")
        self = super().__new__(cls)
        self.args = args
        self.state = {}
        return self

    def __setstate__(self, state: Any) -> None:
        what = f"{self.pickled_module}.{self.pickled_name} state"
        if isinstance(state, tuple) and len(state) == 2 and isinstance(state[0], dict):
            self.budget.copy(len(state[0]) + len(state[1] or {}), what)
            state = {**state[0], **(state[1] or {})}
        if isinstance(state, dict):
            self.budget.copy(len(state), what)
            self.state = dict(state)
        else:
            self.state = {"state": state}

    def __repr__(self) -> str:
        return f"Placeholder({self.pickled_module}.{self.pickled_name}, {self.state!r})"


class _StorageType:
    """Marker for ``torch.FloatStorage`` and friends: only its dtype matters; a pickle cannot
    give it state."""

    __slots__ = ("name", "dtype")

    def __init__(self, name: str) -> None:
        self.name = name
        self.dtype = STORAGE_DTYPES[name]

    def __setstate__(self, state: Any) -> None:
        raise PickleRefused(f"storage type torch.{self.name} takes no pickled state")


class _Budget:
    """Bytes that storages rebuilt from a pickle stream may still claim, and elements that
    allowed callables may still copy.

    Both start at the size of the outermost pickle stream: every storage a genuine file rebuilds
    there is backed by its own bytes in that stream, and every element a genuine file hands to a
    copying constructor takes at least one byte of it, so a small file can neither claim one
    region for many large storages nor copy one memoised container many times.
    """

    def __init__(self, available: int) -> None:
        self.available = available
        self.copies_left = available

    def claim(self, nbytes: int, what: str) -> None:
        if nbytes > self.available:
            raise PickleRefused(
                f"{what} claims {nbytes} bytes, more than the checkpoint holds "
                f"({self.available} bytes left unclaimed)"
            )
        self.available -= nbytes

    def copy(self, n_elements: int, what: str) -> None:
        if n_elements > self.copies_left:
            raise PickleRefused(
                f"{what}: copying {n_elements} elements would exceed the copy budget of this "
                f"checkpoint ({self.copies_left} elements left of one per stream byte); a "
                "genuine file copies each container once"
            )
        self.copies_left -= n_elements


class _Copying:
    """An allowed constructor that copies its one optional argument, a list or tuple; each call
    charges the argument's length to ``budget``. Not a type, so NEWOBJ cannot use it."""

    __slots__ = ("name", "build", "budget")

    def __init__(self, name: str, build: Callable[..., Any], budget: _Budget) -> None:
        self.name, self.build, self.budget = name, build, budget

    def __call__(self, *args: Any) -> Any:
        if len(args) > 1 or (args and not isinstance(args[0], (list, tuple))):
            raise PickleRefused(f"{self.name} takes one list or tuple in a checkpoint")
        self.budget.copy(len(args[0]) if args else 0, self.name)
        return self.build(*args)


class _ExactStream:
    """A pickle stream whose reads return exactly the bytes asked for, or fail
    (``UnpicklingError``): an opcode
    that declares more bytes than the stream holds (a crafted length, a truncated file) is named
    instead of silently reading less."""

    def __init__(self, stream: io.BytesIO) -> None:
        self.stream = stream
        here = stream.tell()
        self.size = stream.seek(0, io.SEEK_END)
        stream.seek(here)

    def remaining(self) -> int:
        return self.size - self.stream.tell()

    def read(self, n: int = -1) -> bytes:
        if n is not None and n > self.remaining():
            raise pickle.UnpicklingError(
                f"the pickle asks for {n} bytes at offset {self.stream.tell()} but only "
                f"{self.remaining()} remain: the file is truncated or declares a false length"
            )
        return self.stream.read(n)

    def readline(self) -> bytes:
        line = self.stream.readline()
        if not line.endswith(b"\n"):
            raise pickle.UnpicklingError(
                "the pickle ends inside a text opcode: the file is truncated"
            )
        return line


class _Storage:
    """A storage read by this module: a flat 1-D tensor of one dtype."""

    def __init__(self, flat: torch.Tensor) -> None:
        self.flat = flat


def _flat_from_bytes(data: bytes, dtype: torch.dtype, numel: int, where: str) -> torch.Tensor:
    itemsize = torch.empty((), dtype=dtype).element_size()
    if len(data) != numel * itemsize:
        raise PickleRefused(
            f"storage {where}: expected {numel * itemsize} bytes ({numel} x {dtype}), "
            f"found {len(data)}"
        )
    if numel == 0:
        return torch.empty(0, dtype=dtype)
    return torch.frombuffer(bytearray(data), dtype=dtype)


def _check_ints(values: Any, what: str) -> tuple[int, ...]:
    if not isinstance(values, (tuple, list, torch.Size)) or not all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values
    ):
        raise PickleRefused(f"tensor {what} must be non-negative integers, found {values!r}")
    return tuple(values)


def _rebuild_tensor(
    budget: _Budget, storage: Any, offset: Any, size: Any, stride: Any
) -> torch.Tensor:
    """A strided view of ``storage``, refused unless every element lies inside it; the tensor's
    copies of ``size`` and ``stride`` are charged to ``budget``."""
    if not isinstance(storage, _Storage):
        raise PickleRefused(f"tensor rebuild got {type(storage).__name__}, expected a storage")
    if not isinstance(size, (tuple, list, torch.Size)) or not isinstance(
        stride, (tuple, list, torch.Size)
    ):
        raise PickleRefused(f"tensor size and stride must be sequences, found {size!r}, {stride!r}")
    budget.copy(len(size) + len(stride), "tensor size and stride")
    size = _check_ints(size, "size")
    stride = _check_ints(stride, "stride")
    (offset,) = _check_ints((offset,), "offset")
    if len(size) != len(stride):
        raise PickleRefused(f"tensor size {size} and stride {stride} differ in length")
    numel = storage.flat.numel()
    if 0 not in size:
        last = offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True))
        if last >= numel:
            raise PickleRefused(
                f"tensor of size {size}, stride {stride}, offset {offset} reads past the end "
                f"of its storage ({numel} elements)"
            )
        if _overlaps(size, stride):
            raise PickleRefused(
                f"tensor of size {size}, stride {stride} reads some storage elements more than "
                "once (a stride-0 or overlapping view): a small file would unfold into a large "
                "tensor; a checkpoint holds each element once"
            )
    return torch.as_strided(storage.flat, size, stride, offset)


def _overlaps(size: tuple[int, ...], stride: tuple[int, ...]) -> bool:
    """True when two indices of the strided view (``size``, ``stride``) reach one element.

    Sufficient test for no overlap: with the dims of size > 1 sorted by stride, each stride
    exceeds the farthest element the smaller dims reach. Views ``torch.save`` writes (slices,
    transposes, contiguous tensors) pass; ``expand``-ed (stride 0) tensors do not.
    """
    reach = 0
    for step, n in sorted((s, n) for n, s in zip(size, stride, strict=True) if n > 1):
        if step <= reach:
            return True
        reach += (n - 1) * step
    return False


def _rebuild_tensor_v2(
    budget: _Budget,
    storage: Any,
    offset: Any,
    size: Any,
    stride: Any,
    requires_grad: Any = False,
    backward_hooks: Any = None,
    metadata: Any = None,
) -> torch.Tensor:
    if backward_hooks:
        raise PickleRefused("tensors with backward hooks are not supported")
    return _rebuild_tensor(budget, storage, offset, size, stride)


def _rebuild_parameter(data: Any, requires_grad: Any = False, backward_hooks: Any = None) -> Any:
    if not isinstance(data, torch.Tensor):
        raise PickleRefused(f"parameter rebuild got {type(data).__name__}, expected a tensor")
    if backward_hooks:
        raise PickleRefused("parameters with backward hooks are not supported")
    return data


_DICT_FACTORY = object()
"""What ``builtins.dict`` resolves to: an inert marker, only accepted as a defaultdict factory."""


def _plain_dict(factory: Any = None) -> dict:
    """``collections.defaultdict(dict)`` rebuilt as an empty plain dict (filled by SETITEMS); the
    factory is never called."""
    if factory is not None and factory is not _DICT_FACTORY:
        raise PickleRefused("collections.defaultdict is only allowed with dict as its factory")
    return {}


def _placeholder_class(module: str, name: str, budget: _Budget) -> type[Placeholder]:
    return type(
        name, (Placeholder,), {"pickled_module": module, "pickled_name": name, "budget": budget}
    )


class _Unpickler(pickle._Unpickler):
    """The pure-Python ``pickle`` unpickler (the C one has no hook for BUILD) with an allow-list
    ``find_class``, our storage loader and a BUILD that only placeholders and ``OrderedDict``
    attributes accept."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(
        self,
        file: io.BufferedIOBase,
        *,
        placeholder_modules: Iterable[str],
        load_storage: Callable[[tuple], _Storage] | None,
        budget: _Budget,
        encoded: dict[str, bytes],
    ) -> None:
        self._exact = _ExactStream(file)
        super().__init__(self._exact)
        self._placeholder_modules = frozenset(placeholder_modules)
        self._load_storage = load_storage
        self._budget = budget
        self._encoded = encoded
        self._placeholders: dict[tuple[str, str], type[Placeholder]] = {}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        key = (module, name)
        allowed = self._allowed(key)
        if allowed is not None:
            return allowed
        if module in self._placeholder_modules:
            if key not in self._placeholders:
                self._placeholders[key] = _placeholder_class(module, name, self._budget)
            return self._placeholders[key]
        raise PickleRefused(
            f"refused global {module}.{name}: only tensors, plain containers, torch.device, "
            "torch dtypes and the PatchSAE config class may appear in a checkpoint"
        )

    def _allowed(self, key: tuple[str, str]) -> Any:
        module, name = key
        copying = {
            ("collections", "OrderedDict"): collections.OrderedDict,
            ("builtins", "set"): set,
            ("builtins", "frozenset"): frozenset,
            ("torch", "Size"): torch.Size,
        }
        if key in copying:
            return _Copying(f"{module}.{name}", copying[key], self._budget)
        fixed = {
            ("_codecs", "encode"): self._codecs_encode,
            ("torch", "device"): torch.device,
            ("torch._utils", "_rebuild_tensor"): functools.partial(_rebuild_tensor, self._budget),
            ("torch._utils", "_rebuild_tensor_v2"): functools.partial(
                _rebuild_tensor_v2, self._budget
            ),
            ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
            ("torch.storage", "_load_from_bytes"): self._load_from_bytes,
        }
        if key in fixed:
            return fixed[key]
        if key == ("builtins", "dict"):
            return _DICT_FACTORY
        if key == ("collections", "defaultdict"):
            return _plain_dict
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(name)
        if module == "torch" and name in TORCH_DTYPES:
            return TORCH_DTYPES[name]
        return None

    def load_build(self) -> None:
        """BUILD: ``stack[-2]`` takes the state ``stack[-1]``; placeholders keep it (storage
        type markers refuse it), an ``OrderedDict`` takes a dict as attributes (``_metadata``
        of a state dict), charged to the copy budget; anything else refuses it."""
        state = self.stack.pop()
        inst = self.stack[-1]
        if isinstance(inst, (Placeholder, _StorageType)):
            inst.__setstate__(state)
        elif type(inst) is collections.OrderedDict and isinstance(state, dict):
            self._budget.copy(len(state), "collections.OrderedDict attributes")
            inst.__dict__.update(state)
        else:
            raise PickleRefused(
                f"{type(inst).__module__}.{type(inst).__qualname__} takes no pickled state in "
                "a checkpoint"
            )

    dispatch[pickle.BUILD[0]] = load_build

    def load_bytearray8(self) -> None:
        """BYTEARRAY8, its length checked against the bytes left before it is allocated."""
        (size,) = struct.unpack("<Q", self.read(8))
        if size > self._exact.remaining():
            raise pickle.UnpicklingError(
                f"a bytearray of {size} bytes is declared but only {self._exact.remaining()} "
                "remain: the file is truncated or declares a false length"
            )
        self.append(bytearray(self.read(size)))

    dispatch[pickle.BYTEARRAY8[0]] = load_bytearray8

    def persistent_load(self, pid: Any) -> Any:
        if self._load_storage is None:
            raise PickleRefused(f"unexpected persistent id {pid!r} in a plain pickle")
        if not isinstance(pid, tuple) or not pid or pid[0] != "storage":
            raise PickleRefused(f"unsupported persistent id {pid!r}: only storages are allowed")
        return self._load_storage(pid)

    def _codecs_encode(self, text: Any, encoding: Any = "utf-8") -> bytes:
        """``text.encode("latin1")``, one shared result per distinct string (bytes are immutable),
        so calling it again on a memoized string allocates nothing."""
        if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
            raise PickleRefused(
                f"_codecs.encode is only allowed on str with latin1, got {encoding!r}"
            )
        if text not in self._encoded:
            self._encoded[text] = text.encode("latin1")
        return self._encoded[text]

    def _load_from_bytes(self, data: Any) -> Any:
        if not isinstance(data, bytes):
            raise PickleRefused("torch.storage._load_from_bytes expects bytes")
        return _read_legacy(
            io.BytesIO(data), self._placeholder_modules, self._budget, self._encoded
        )


def _storage_spec(pid: tuple, n_fields: int) -> tuple[torch.dtype, str, int]:
    """(dtype, key, numel) of a ``('storage', type, key, location, numel, ...)`` persistent id."""
    if len(pid) != n_fields:
        raise PickleRefused(f"malformed storage id {pid!r}")
    storage_type, key, _location, numel = pid[1:5]
    if isinstance(storage_type, _StorageType):
        dtype = storage_type.dtype
    elif isinstance(storage_type, torch.dtype):
        dtype = storage_type
    else:
        raise PickleRefused(f"unknown storage type {storage_type!r}")
    if not isinstance(key, str) or not isinstance(numel, int) or numel < 0:
        raise PickleRefused(f"malformed storage id {pid!r}")
    return dtype, key, numel


def _too_large(what: str, limit: int) -> PickleRefused:
    return PickleRefused(
        f"{what} is larger than max_bytes={limit} bytes; pass a larger max_bytes to "
        "read_pickled_checkpoint if the file is trusted and really that large"
    )


def _inflation_limit(compressed: int, max_inflation: float) -> float:
    """The most bytes ``compressed`` bytes may decompress to (never less than 1 MiB)."""
    return max(INFLATION_FLOOR_BYTES, max_inflation * compressed)


def _check_inflation(size: int, compressed: int, max_inflation: float, what: str) -> None:
    if size > _inflation_limit(compressed, max_inflation):
        raise PickleRefused(
            f"{what} decompresses from {compressed} to at least {size} bytes, more than "
            f"max_inflation={max_inflation:g} times: weights barely compress, so this is a "
            "decompression bomb; pass a larger max_inflation if the file is trusted"
        )


def _read_capped(handle: IO[bytes], limit: int, what: str, stop_after: int | None = None) -> bytes:
    """All of ``handle``, read (and decompressed) in chunks; refused once past ``limit`` bytes.

    With ``stop_after``, reading also stops after the first chunk that passes it (the caller
    then refuses what it got).
    """
    buffer = io.BytesIO()
    while chunk := handle.read(READ_CHUNK_BYTES):
        if buffer.tell() + len(chunk) > limit:
            raise _too_large(what, limit)
        buffer.write(chunk)
        if stop_after is not None and buffer.tell() > stop_after:
            break
    return buffer.getvalue()


def _read_zip(
    archive: zipfile.ZipFile,
    placeholder_modules: Iterable[str],
    max_bytes: int,
    max_inflation: float,
) -> Any:
    """The object of a zip-format ``torch.save`` archive, reading at most ``max_bytes``
    uncompressed bytes from its members, none inflating past ``max_inflation`` times its
    compressed size."""
    pickles = [n for n in archive.namelist() if n.endswith("data.pkl") and n.count("/") == 1]
    if len(pickles) != 1:
        raise PickleRefused("zip archive is not a torch checkpoint: no single <name>/data.pkl")
    prefix = pickles[0][: -len("data.pkl")]
    names = set(archive.namelist())
    left = max_bytes

    def read_member(name: str) -> bytes:
        nonlocal left
        info = archive.getinfo(name)
        size = info.file_size
        if info.compress_type != zipfile.ZIP_STORED:
            _check_inflation(size, info.compress_size, max_inflation, f"zip member {name}")
        if size > left:
            raise _too_large(
                f"zip member {name} ({size} bytes) with the members read before", max_bytes
            )
        left -= size
        with archive.open(name) as handle:
            return _read_capped(handle, size, f"zip member {name}")

    if f"{prefix}byteorder" in names and read_member(f"{prefix}byteorder") != b"little":
        raise PickleRefused("big-endian torch checkpoints are not supported")
    storages: dict[str, _Storage] = {}

    def load_storage(pid: tuple) -> _Storage:
        dtype, key, numel = _storage_spec(pid, 5)
        if key not in storages:
            name = f"{prefix}data/{key}"
            if name not in names:
                raise PickleRefused(f"storage {key} is missing from the archive ({name})")
            itemsize = torch.empty((), dtype=dtype).element_size()
            if archive.getinfo(name).file_size != numel * itemsize:
                raise PickleRefused(
                    f"storage {key}: expected {numel * itemsize} bytes ({numel} x {dtype}), "
                    f"found {archive.getinfo(name).file_size}"
                )
            storages[key] = _Storage(_flat_from_bytes(read_member(name), dtype, numel, key))
        if storages[key].flat.dtype != dtype:
            raise PickleRefused(f"storage {key} is used with two dtypes")
        return storages[key]

    data = read_member(pickles[0])
    return _Unpickler(
        io.BytesIO(data),
        placeholder_modules=placeholder_modules,
        load_storage=load_storage,
        budget=_Budget(len(data)),
        encoded={},
    ).load()


def _read_legacy(
    stream: io.BytesIO,
    placeholder_modules: Iterable[str],
    budget: _Budget,
    encoded: dict[str, bytes],
) -> Any:
    """The object of a legacy (pre-zip) ``torch.save`` stream, storages included; each storage
    claims its size from ``budget`` before it is allocated."""

    def unpickler(load_storage: Callable[[tuple], _Storage] | None) -> _Unpickler:
        return _Unpickler(
            stream,
            placeholder_modules=placeholder_modules,
            load_storage=load_storage,
            budget=budget,
            encoded=encoded,
        )

    if unpickler(None).load() != LEGACY_MAGIC:
        raise PickleRefused("not a legacy torch stream: wrong magic number")
    if unpickler(None).load() != LEGACY_PROTOCOL:
        raise PickleRefused("unsupported legacy torch protocol version")
    sys_info = unpickler(None).load()
    if not isinstance(sys_info, dict) or not sys_info.get("little_endian", False):
        raise PickleRefused("big-endian torch checkpoints are not supported")
    storages: dict[str, _Storage] = {}

    def load_storage(pid: tuple) -> _Storage:
        dtype, key, numel = _storage_spec(pid, 6)
        if pid[5] is not None:
            raise PickleRefused("legacy storage views are not supported")
        if key not in storages:
            itemsize = torch.empty((), dtype=dtype).element_size()
            budget.claim(numel * itemsize, f"storage {key} ({numel} x {dtype})")
            storages[key] = _Storage(torch.empty(numel, dtype=dtype))
        if storages[key].flat.dtype != dtype:
            raise PickleRefused(f"storage {key} is used with two dtypes")
        return storages[key]

    result = unpickler(load_storage).load()
    keys = unpickler(None).load()
    if not isinstance(keys, list) or set(keys) != set(storages):
        raise PickleRefused("legacy torch stream: storage keys do not match the object")
    for key in keys:
        flat = storages[key].flat
        header = stream.read(8)
        if len(header) != 8:
            raise PickleRefused(f"legacy torch stream ends before storage {key}")
        (numel,) = struct.unpack("<q", header)
        nbytes = numel * flat.element_size()
        if numel != flat.numel():
            raise PickleRefused(f"storage {key}: expected {flat.numel()} elements, found {numel}")
        flat.copy_(_flat_from_bytes(stream.read(nbytes), flat.dtype, numel, key))
    return result


def read_pickled_checkpoint(
    path: str | Path,
    placeholder_modules: Iterable[str] = (),
    max_bytes: int = MAX_CHECKPOINT_BYTES,
    max_inflation: float = MAX_INFLATION,
) -> Any:
    """The object stored at ``path`` by ``torch.save`` (zip or legacy) or ``pickle.dump`` (gzip
    or not), rebuilt without importing or calling anything outside the allow-list.

    ``max_bytes`` caps the uncompressed bytes read: the whole plain or gzip stream, or the zip
    members together. ``max_inflation`` caps what compressed data may decompress to: a gzip
    stream or a compressed zip member at most that many times its compressed size (at least
    1 MiB). Raises ``PickleRefused`` for a refused global, a file past either cap or a
    malformed file.
    """
    path = Path(path)
    placeholder_modules = tuple(placeholder_modules)
    with open(path, "rb") as handle:
        head = handle.read(4)
    try:
        if head.startswith(b"PK\x03\x04"):
            with zipfile.ZipFile(path) as archive:
                return _read_zip(archive, placeholder_modules, max_bytes, max_inflation)
        if head.startswith(b"\x1f\x8b"):
            compressed = path.stat().st_size
            inflated = int(_inflation_limit(compressed, max_inflation))
            with gzip.open(path, "rb") as handle:
                data = _read_capped(handle, max_bytes, f"{path} (decompressed)", inflated)
            _check_inflation(len(data), compressed, max_inflation, f"{path} (gzip)")
        else:
            with open(path, "rb") as handle:
                data = _read_capped(handle, max_bytes, str(path))
        return _read_stream(data, placeholder_modules)
    except PickleRefused:
        raise
    except (pickle.UnpicklingError, EOFError, OSError, zipfile.BadZipFile, struct.error) as err:
        raise PickleRefused(f"{path} is not a readable checkpoint: {_reason(err)}") from None
    except (
        TypeError,
        ValueError,
        AttributeError,
        KeyError,
        IndexError,
        RuntimeError,
        RecursionError,
        OverflowError,
        MemoryError,
    ) as err:
        raise PickleRefused(
            f"{path} is not a readable checkpoint: {type(err).__name__}: {_reason(err)}"
        ) from None


def _reason(err: BaseException) -> str:
    """``str(err)``, cut to one line; the class name when the error carries no message."""
    text = str(err).splitlines()[0] if str(err) else ""
    return text[:300] or f"{type(err).__name__} (the file ends early or is malformed)"


def _read_stream(data: bytes, placeholder_modules: tuple[str, ...]) -> Any:
    """A plain pickle, or a legacy torch stream when the first pickle is the torch magic."""
    stream = io.BytesIO(data)
    budget, encoded = _Budget(len(data)), {}
    first = _Unpickler(
        stream,
        placeholder_modules=placeholder_modules,
        load_storage=None,
        budget=budget,
        encoded=encoded,
    ).load()
    if first == LEGACY_MAGIC:
        return _read_legacy(io.BytesIO(data), placeholder_modules, budget, encoded)
    if stream.read(1):
        raise PickleRefused("unexpected data after the pickled object")
    return first
