"""The offline demo: pre-train on generated glyphs, transfer to real digits, compare with scratch."""

from ..recipes.demo_scale import FULL, DemoConfig
from .story import run_demo

__all__ = ["FULL", "DemoConfig", "run_demo"]
