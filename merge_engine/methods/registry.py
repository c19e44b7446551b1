"""The merge methods by name, built from an explicit list."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ..errors import InvalidParameterError
from .base import MergeMethod
from .core import Core
from .full_space import DareLinear, DareTies, Ties
from .knots import KnotsDareTies, KnotsTies
from .regmean import RegMean
from .svd_cur import SvdCur
from .ta import TaskArithmetic
from .tsvm import Tsvm


class MethodRegistry:
    """Name → method. Duplicate names are an error; unknown names list the valid ones."""

    def __init__(self, methods: Iterable[MergeMethod[Any]]) -> None:
        self._methods: dict[str, MergeMethod[Any]] = {}
        for method in methods:
            if method.name in self._methods:
                raise ValueError(f"merge method {method.name!r} is registered twice")
            self._methods[method.name] = method

    def get(self, name: str) -> MergeMethod[Any]:
        try:
            return self._methods[name]
        except KeyError:
            raise InvalidParameterError(
                "method", f"unknown merge method {name!r}; valid: {', '.join(self._methods)}"
            ) from None

    def names(self) -> tuple[str, ...]:
        return tuple(self._methods)


METHODS = MethodRegistry(
    [
        TaskArithmetic(),
        Ties(),
        DareLinear(),
        DareTies(),
        Tsvm(),
        KnotsTies(),
        KnotsDareTies(),
        Core(),
        SvdCur(),
        RegMean(),
    ]
)
