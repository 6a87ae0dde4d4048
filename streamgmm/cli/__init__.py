"""Command line and file replay."""

from .main import main

__all__ = ["main"]
