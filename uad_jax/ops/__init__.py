"""Numerical ops shared by several methods (SSIM, GMS, resize, transposed conv, BatchNorm)."""
