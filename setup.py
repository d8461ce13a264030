"""Builds the C++/CUDA extension fastssl._C (see csrc/)."""

from setuptools import setup

setup()
