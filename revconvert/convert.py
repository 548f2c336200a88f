"""Placeholder until the conversion lands (issue 4)."""
from __future__ import annotations


class ConvertConfig:
    pass


def convert(*args, **kwargs):
    raise NotImplementedError("convert lands with issue 4")
