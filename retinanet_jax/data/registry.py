"""The data sources by name, and building one from a name plus keyword arguments.

``train.py`` configs (``config.dataset.source`` / ``.train`` / ``.val``) and
``retinanet-jax evaluate --data SOURCE key=value ...`` both name sources here.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

from retinanet_jax.data.coco_json import CocoJsonSource
from retinanet_jax.data.csv_source import CsvSource
from retinanet_jax.data.shapes import ShapesSource
from retinanet_jax.data.tfds_source import TfdsSource
from retinanet_jax.data.voc_xml import VocXmlSource

SOURCES = {
    "shapes": ShapesSource,
    "coco_json": CocoJsonSource,
    "voc_xml": VocXmlSource,
    "csv": CsvSource,
    "tfds": TfdsSource,
}


class SourceArgumentError(TypeError):
    """Keyword arguments that do not fit the source's constructor (unknown or missing names)."""


def source_class(name: str, what: str = "data source") -> type:
    """``SOURCES[name]``; ``ValueError`` naming ``what`` (e.g. ``"config.dataset.source"``)."""
    if name not in SOURCES:
        raise ValueError(f"{what}: unknown data source {name!r}; one of {sorted(SOURCES)}")
    return SOURCES[name]


def check_arguments(cls: type, kwargs: Mapping[str, Any], where: str) -> None:
    """:class:`SourceArgumentError` naming the keys of ``kwargs`` that ``cls(**kwargs)`` would
    reject (unknown) or lacks (required), checked against its signature before calling it."""
    params = dict(inspect.signature(cls).parameters)
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    named = {n: p for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    unknown = [] if takes_any else sorted(set(kwargs) - set(named))
    missing = sorted(n for n, p in named.items() if p.default is p.empty and n not in kwargs)
    if unknown or missing:
        problems = ([f"unknown arguments {unknown}"] if unknown else []) + (
            [f"missing required arguments {missing}"] if missing else []
        )
        raise SourceArgumentError(
            f"{where}: {' and '.join(problems)} for {cls.__name__}; it takes {list(named)}"
        )


def make_source(
    name: str, kwargs: Mapping[str, Any], *, where: str = "data source arguments", what: str = "data source"
) -> Any:
    """``SOURCES[name](**kwargs)``. Unknown names are a ``ValueError`` naming ``what``, bad
    keys a :class:`SourceArgumentError` naming ``where`` and the keys; errors raised by the
    constructor itself (missing files, bad values, ...) propagate unchanged."""
    cls = source_class(name, what)
    check_arguments(cls, kwargs, where)
    return cls(**kwargs)
