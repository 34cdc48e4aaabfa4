"""vl: Hydra-configured PyTorch Lightning framework for vision-and-language BERTs."""

__version__ = "0.1.0"
