"""Compute kernels. ``reference`` holds the plain-torch math every fast kernel is tested against."""
