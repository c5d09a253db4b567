"""Triton kernels for Greta, imported as greta.kernels (see pyproject)."""
