"""Readers of benchmark datasets (DAVIS, SPair-71k) and synthetic warp pairs."""
