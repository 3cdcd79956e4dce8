"""finebench: reproduce, compare and write up fine-grained image recognition results."""

__version__ = "0.1.0"
