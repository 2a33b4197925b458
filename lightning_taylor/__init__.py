"""lightning-taylor: incremental learning for pre-trained ViTs by second-order task arithmetic (ITA / IEL)."""

__version__ = "0.1.0"
