"""The public operations, one module each; ``loratool`` re-exports each function by name."""
