"""The backend registry: (op, backend) -> implementation.

Every backend is a package under ``tformer/backends/<name>/``. Its ``__init__`` is
cheap to import and answers one question, ``unavailable_reason()``: ``None`` when the
backend can run in this process, otherwise a sentence that says why not and how to get
it. Its op modules register implementations with :func:`register`; the registry imports
them only when the backend is first used, so ``import tformer`` needs neither Triton nor
the compiled extension.

Selection order for an op call: the ``backend=`` argument, else the innermost
``with tformer.backend(...)`` block, else the ``TFORMER_BACKEND`` environment variable,
else ``"auto"``. A backend may declare variants (``"triton:atomic_dq"``, see
:mod:`tformer.ops.variants`). :mod:`tformer.ops.dispatch` resolves a call: an explicit name here,
``auto`` through :mod:`tformer.ops.auto`.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import importlib
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from . import overrides
from .validation import dtype_name
from .variants import Variant, split


BACKENDS: tuple[str, ...] = ("cuda", "triton", "torch", "reference")
OPS: tuple[str, ...] = ("attention", "attention_varlen", "layer_norm", "rms_norm", "softmax")


class BackendError(RuntimeError):
    """A backend was asked for that does not exist, is not available, or cannot take the input."""


class UnsupportedInput(BackendError):
    """The backend asked for is available but does not take this input (an op it lacks, a
    device, dtype or feature it does not handle)."""


@dataclass
class Implementation:
    fn: Callable
    devices: frozenset[str]
    dtypes: frozenset[torch.dtype]
    # Optional extra check on the validated arguments: returns None or a reason.
    supports: Callable[..., str | None] | None = None


_NOT_PROBED = object()


@dataclass
class _Backend:
    name: str
    module: str
    impls: dict[str, Implementation] = field(default_factory=dict)
    loaded: bool = False
    # None (available), a reason string, or _NOT_PROBED: probed once per process, since
    # "auto" asks on every op call.
    reason: object = _NOT_PROBED
    variants: dict[str, Variant] | None = None  # read from the package's VARIANTS on first ask


_backends: dict[str, _Backend] = {
    name: _Backend(name, f"tformer.backends.{name}") for name in BACKENDS
}
_default_stack: list[str] = []


def variants(backend_name: str) -> dict[str, Variant]:
    """The variants ``backend_name`` declares (its package's ``VARIANTS``), by name."""
    backend = _backends[backend_name]
    if backend.variants is None:
        backend.variants = dict(getattr(importlib.import_module(backend.module), "VARIANTS", {}))
    return backend.variants


def backend_names() -> tuple[str, ...]:
    """Every backend, each followed by its variants (``"triton"``, ``"triton:atomic_dq"``, ...)."""
    return tuple(name for base in BACKENDS for name in (base, *(f"{base}:{v}" for v in variants(base))))


def register(op: str, backend: str, *, devices=("cuda",), dtypes=(torch.float16, torch.bfloat16, torch.float32),
             supports: Callable[..., str | None] | None = None):
    """Decorator: make ``fn`` the implementation of ``op`` in ``backend``.

    ``devices`` are device types (``"cuda"``, ``"cpu"``) and ``dtypes`` the input dtypes
    the implementation takes; anything else is refused with a clear error before it runs.
    """
    if op not in OPS:
        raise ValueError(f"register: unknown op {op!r}; expected one of {OPS}")
    if backend not in _backends:
        raise ValueError(f"register: unknown backend {backend!r}; expected one of {BACKENDS}")

    def decorator(fn):
        _backends[backend].impls[op] = Implementation(fn, frozenset(devices), frozenset(dtypes), supports)
        return fn

    return decorator


# Names already checked, split into (backend, variant): an op call parses its backend name from
# here, since the set of backends and variants is fixed once their packages are imported.
_parsed_names: dict[str, tuple[str, str | None]] = {}


def _check_name(name: str) -> tuple[str, str | None]:
    """``name`` split into (backend, variant); BackendError when it names neither."""
    parsed = _parsed_names.get(name) if isinstance(name, str) else None
    if parsed is not None:
        return parsed
    if not isinstance(name, str):
        raise BackendError(f"backend must be a str, got {type(name).__name__}")
    base, variant = split(name)
    if name != "auto" and (base not in _backends or (variant is not None and variant not in variants(base))):
        known = (*backend_names(), "auto")
        close = difflib.get_close_matches(name, known, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise BackendError(f"unknown backend {name!r}; expected one of {known}.{hint}")
    _parsed_names[name] = (base, variant)
    return base, variant


def unavailable_reason(name: str) -> str | None:
    """Why ``name`` (a backend or a variant) cannot run in this process, or None when it can."""
    backend = _backends[_check_name(name)[0]]
    if backend.reason is _NOT_PROBED:
        backend.reason = importlib.import_module(backend.module).unavailable_reason()
    return backend.reason


def available_backends() -> dict[str, str | None]:
    """Every backend and variant mapped to None (available) or the reason it is not, e.g.
    ``{"cuda": "the CUDA extension was not built (...)", "triton": None, "triton:atomic_dq": None,
    "torch": None, "reference": None}``."""
    return {name: unavailable_reason(name) for name in backend_names()}


def _load(name: str) -> _Backend:
    backend = _backends[name]
    if not backend.loaded:
        reason = unavailable_reason(name)
        if reason is not None:
            raise BackendError(f"backend {name!r} is not available: {reason}")
        package = importlib.import_module(backend.module)
        package.load()  # imports the op modules, which call register()
        backend.loaded = True
    return backend


def prepare() -> None:
    """Probe every backend and load the available ones, now.

    ``import tformer`` calls this, so that the first op call inside ``torch.compile`` finds
    everything resolved: dynamo cannot trace imports, but it traces the dictionary lookups
    that dispatch is once the backends are loaded. A backend whose modules fail to import
    is recorded as unavailable with the error, rather than breaking ``import tformer``.
    """
    for name, backend in _backends.items():
        if unavailable_reason(name) is None and not backend.loaded:
            try:
                _load(name)
            except Exception as error:  # noqa: BLE001 - reported through available_backends()
                backend.reason = f"its modules failed to import: {type(error).__name__}: {error}"


def default_backend() -> str:
    """The backend an op uses when called without ``backend=``."""
    if _default_stack:
        return _default_stack[-1]
    return overrides.default_backend()


@contextlib.contextmanager
def backend(name: str) -> Iterator[None]:
    """``with tformer.backend("triton"):`` makes ``name`` the default inside the block."""
    _check_name(name)
    _default_stack.append(name)
    try:
        yield
    finally:
        _default_stack.pop()


def _refusal(impl: Implementation | None, op: str, name: str, device: torch.device, dtype: torch.dtype,
             args: dict) -> str | None:
    if impl is None:
        return f"backend {name!r} has no implementation of {op!r}"
    if device.type not in impl.devices:
        hint = " (set TRITON_INTERPRET=1 to run Triton kernels on the CPU)" if name == "triton" else ""
        return f"backend {name!r} runs {op!r} on {sorted(impl.devices)} tensors, got a {device.type} tensor{hint}"
    if dtype not in impl.dtypes:
        names = sorted(dtype_name(d) for d in impl.dtypes)
        return f"backend {name!r} runs {op!r} on dtypes {names}, got {dtype_name(dtype)}"
    if impl.supports is not None:
        return impl.supports(**args)
    return None


_bound_cache: dict[tuple, Callable] = {}


def _bound(fn: Callable, options: tuple) -> Callable:
    # Kept, so a variant's implementation is one stable object (torch.compile guards on it).
    if not options:
        return fn
    key = (fn, options)
    if key not in _bound_cache:
        _bound_cache[key] = functools.partial(fn, **dict(options))
    return _bound_cache[key]


def implementation(op: str, name: str) -> tuple[Implementation | None, Callable | None]:
    """(the registered implementation, the callable with the variant's and the environment's
    kernel arguments bound) of ``op`` in backend or variant ``name``."""
    base, variant_name = _check_name(name)
    impl = _load(base).impls.get(op)
    if impl is None:
        return None, None
    options = overrides.kernel_options(base, op)
    variant = variants(base).get(variant_name) if variant_name else None
    if variant is not None and op in variant.ops:
        options = {**options, **variant.options}
    return impl, _bound(impl.fn, tuple(sorted(options.items())) if options else ())


def try_implementation(op: str, name: str, device: torch.device, dtype: torch.dtype,
                       args: dict) -> tuple[Callable | None, str | None]:
    """(the callable, None) when ``name`` can run this call, else (None, why not): it is
    unavailable, lacks the op, or does not take the input. One lookup, for every op call."""
    why = unavailable_reason(name)
    if why is not None:
        return None, why
    impl, fn = implementation(op, name)
    why = _refusal(impl, op, name, device, dtype, args)
    return (fn, None) if why is None else (None, why)


def refusal(op: str, name: str, device: torch.device, dtype: torch.dtype, args: dict) -> str | None:
    """Why ``name`` cannot run this call (unavailable, or it does not take the input), or None."""
    return try_implementation(op, name, device, dtype, args)[1]


def resolve_named(op: str, name: str, device: torch.device, dtype: torch.dtype, args: dict) -> Callable:
    """The implementation of ``op`` in backend or variant ``name`` for this call; UnsupportedInput
    (with the reason) when it does not take the input."""
    _load(_check_name(name)[0])  # an unavailable backend raises BackendError, with its reason
    fn, reason = try_implementation(op, name, device, dtype, args)
    if reason is not None:
        raise UnsupportedInput(f"{op}: {reason}. Use backend='reference' or 'auto' for this input.")
    return fn
