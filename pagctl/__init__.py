"""pagctl: train classifiers with perceptually aligned gradients and measure their robustness."""

__version__ = "0.1.0"
