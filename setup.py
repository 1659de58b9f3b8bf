"""Build script: all metadata lives in pyproject.toml.

It exists because the C++ CPU kernels (csrc/) will be built here as a torch
extension; until they land there is nothing to compile.
"""

from setuptools import setup

setup()
