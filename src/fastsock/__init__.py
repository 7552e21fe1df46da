"""fastsock: record which processes talk to which, from the kernel's socket tables."""

__version__ = "0.1.0"
