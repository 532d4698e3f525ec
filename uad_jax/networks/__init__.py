"""Neural networks shared by the methods (NHWC, flax.linen)."""
