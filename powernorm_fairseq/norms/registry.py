"""The one registry of norms: name (and variant) -> class. Pure Python, no fairseq.

A norm is one module and one registration, as fairseq's ``@register_model`` and timm's
``_NORM_MAP``::

    from powernorm_fairseq.norms import MaskedNorm, register_norm

    @register_norm("scale")
    class Scale(MaskedNorm):
        stateful = False
        def __init__(self, num_features, eps=1e-5, affine=True, device=None, dtype=None):
            super().__init__(num_features, eps, affine, device=device, dtype=dtype)
            self.reset_parameters()
        def _normalize(self, x2d, keep):
            return x2d * self.weight + self.bias

Registered, a norm works in :func:`build_norm`, in ``--encoder-norm`` / ``--decoder-norm`` and the
per-site flags of both fairseq model families (each class reads its fairseq options in
:meth:`~powernorm_fairseq.norms.base.MaskedNorm.from_options`), in the presets' norm config group
and in the contract tests. Code outside the package registers the same way (fairseq: a
``--user-dir`` package that imports ``powernorm_fairseq.models`` and registers its norms).

A name may have *variants*, classes selected by a keyword (``build_norm("power", C,
variant="reference")``) or, from fairseq options, by an option (``--pn-variant``); the variant is
resolved here and nowhere else.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field


@dataclass
class _Entry:
    name: str
    classes: dict = field(default_factory=dict)  # variant (None: the only one) -> class
    default_variant: str | None = None
    variant_option: str | None = None  # the options attribute that selects the variant


_NORMS: dict[str, _Entry] = {}
#: class -> registered name, for :func:`norm_family`
_NAME_OF: dict[type, str] = {}


def register_norm(name: str, cls: type | None = None, *, variant: str | None = None,
                  default: bool = False, variant_option: str | None = None):
    """Register ``cls`` as the norm ``name`` (or as its ``variant``); a decorator without ``cls``.

    Args:
        name: what :func:`build_norm`, ``--encoder-norm`` and the presets call it.
        cls: a module class taking ``(num_features, **kwargs)``, called as
            ``norm(x, padding_mask=None)`` (subclass :class:`~.base.MaskedNorm` for the layout,
            masking and state handling).
        variant: register ``cls`` as this variant of ``name`` (``build_norm(name, C,
            variant=...)``).
        default: this variant is the one built when none is named.
        variant_option: the options attribute (fairseq flag) that selects the variant when the
            norm is built from options (:func:`build_norm_from_options`).

    Raises:
        ValueError: ``name`` (or its variant) is registered already with another class, or a
            variant is added to a name registered without variants (and vice versa).
    """
    def add(cls: type) -> type:
        if not name or not isinstance(name, str) or not name.replace("_", "").isalnum():
            raise ValueError(f"register_norm: a norm name is letters, digits and '_', got {name!r}")
        entry = _NORMS.setdefault(name, _Entry(name))
        if entry.classes and (variant is None) != (None in entry.classes):
            raise ValueError(f"register_norm: {name!r} is registered "
                             + ("without variants" if None in entry.classes else "with variants")
                             + f"; cannot add {cls.__name__} " + (f"as variant {variant!r}" if variant else "alone"))
        old = entry.classes.get(variant)
        if old is not None and old is not cls:
            raise ValueError(f"register_norm: {name!r}" + (f" variant {variant!r}" if variant else "")
                             + f" is {old.__module__}.{old.__qualname__} already")
        entry.classes[variant] = cls
        if variant is not None and (default or entry.default_variant is None):
            entry.default_variant = variant
        if variant_option:
            entry.variant_option = variant_option
        _NAME_OF[cls] = name
        return cls

    return add if cls is None else add(cls)


def unregister_norm(name: str) -> None:
    """Remove the norm ``name`` (all its variants) from the registry: the inverse of
    :func:`register_norm`, for code that registers a norm for a while (a test, a notebook
    re-running its cell). Modules built already keep working.

    Raises:
        ValueError: ``name`` is not registered (naming the registered ones).
    """
    entry = _entry(name)
    for cls in entry.classes.values():
        _NAME_OF.pop(cls, None)
    del _NORMS[name]


def norm_names() -> tuple[str, ...]:
    """The registered names, in registration order (the built-in ones first)."""
    return tuple(_NORMS)


def norm_variants(name: str) -> tuple[str, ...]:
    """The variants of ``name`` (empty for a name without variants)."""
    return tuple(v for v in _entry(name).classes if v is not None)


def default_variant(name: str) -> str | None:
    return _entry(name).default_variant


def _entry(name: str) -> _Entry:
    try:
        return _NORMS[name]
    except KeyError:
        raise ValueError(f"unknown norm {name!r}; choose one of {list(_NORMS)} (or a name with its "
                         f"variant: {[f'{n}_{v}' for n, v in norm_configs() if v]})") from None


def split_name(name: str) -> tuple[str, str | None]:
    """``(name, None)`` for a registered name; ``(name, variant)`` for ``"<name>_<variant>"``
    (``"power_reference"``); else a ValueError naming the choices."""
    if name in _NORMS:
        return name, None
    for base, variant in norm_configs():
        if variant is not None and name == f"{base}_{variant}":
            return base, variant
    _entry(name)  # raises, listing the choices
    raise AssertionError  # unreachable


def norm_class(name: str, variant: str | None = None) -> type:
    """The class of ``name`` (its ``variant``, else its default variant)."""
    entry = _entry(name)
    if None in entry.classes:
        if variant is not None:
            raise ValueError(f"norm {name!r} has no variants (got variant={variant!r})")
        return entry.classes[None]
    variant = entry.default_variant if variant is None else variant
    if variant not in entry.classes:
        raise ValueError(f"unknown {name} variant {variant!r}; choose one of {sorted(entry.classes)}")
    return entry.classes[variant]


def accepted_kwargs(cls: type) -> list[str]:
    """The keyword arguments ``cls(num_features, ...)`` takes."""
    params = list(inspect.signature(cls.__init__).parameters.values())[2:]
    return [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def build_norm(name: str, num_features: int, **kwargs):
    """Build the norm registered as ``name`` over ``num_features`` channels.

    Args:
        name: a registered name (:func:`norm_names`: ``"layer"``, ``"batch"``, ``"power_v"``,
            ``"power"``, ...). For a name with variants, ``variant=`` selects the class
            (``"power"``: ``"paper"``, the default, or ``"reference"``), or the name says it
            (``"power_reference"``).
        num_features: number of channels ``C``.
        **kwargs: options of that class.

    Raises:
        ValueError: unknown ``name``, ``variant`` or keyword for that class, or invalid values.
    """
    kwargs = dict(kwargs)
    name, variant = split_name(name)
    variants = norm_variants(name)
    if variants and variant is None:
        variant = kwargs.pop("variant", None)
    cls = norm_class(name, variant)
    label = repr(name) + (f" (variant={variant or default_variant(name)!r})" if variants else "")
    accepted = accepted_kwargs(cls)
    # the layout is the base class's (MaskedNorm.batch_first), so a norm whose own signature
    # does not name it still takes it
    layout = {} if "batch_first" in accepted else {k: kwargs.pop(k) for k in ("batch_first",) if k in kwargs}
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for norm {label}; accepted: {accepted}")
    norm = cls(num_features, **kwargs)
    if layout:
        if not hasattr(norm, "batch_first"):
            raise ValueError(f"norm {label} takes no batch_first (not a MaskedNorm)")
        norm.batch_first = bool(layout["batch_first"])
    return norm


def build_norm_from_options(name: str, num_features: int, options, *, num_heads: int = 1,
                            final: bool = False):
    """Build the norm ``name`` from an options object (fairseq's model config, a namespace):
    the variant from the entry's ``variant_option``, the keywords from the class's
    ``from_options(options, num_heads=..., final=...)``.

    Args:
        options: any object whose attributes are the options (missing ones take the class's
            defaults).
        num_heads: attention heads of the side (GroupScaling's default groups).
        final: the norm sits after the last layer (an encoder/decoder output norm).
    """
    entry = _entry(name)
    variant = None
    if None not in entry.classes:
        chosen = getattr(options, entry.variant_option, None) if entry.variant_option else None
        variant = None if chosen is None else str(chosen)
    cls = norm_class(name, variant)
    return cls(num_features, **cls.from_options(options, num_heads=num_heads, final=final))


def norm_family(module) -> str | None:
    """The registered name of a norm module or class (the variants of a name share it), or None
    for a module that is none of the registered norms."""
    cls = module if isinstance(module, type) else type(module)
    return next((_NAME_OF[base] for base in cls.__mro__ if base in _NAME_OF), None)


def norm_configs() -> list[tuple[str, str | None]]:
    """Every (name, variant) pair registered: what a test over the registry runs."""
    return [(name, variant) for name, entry in _NORMS.items() for variant in entry.classes]
