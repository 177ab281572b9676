"""icl-lens: does in-context learning look like gradient descent? A TransformerLens plugin."""

__version__ = "0.1.0"
