"""The package version (read by ``bitdistill --version`` without importing the package's modules)."""

__version__ = "0.1.0"
