"""Simulators that generate training data, torch only."""
from minconv_dist.simulate.navier_stokes import gaussian_random_field, paper_forcing, solve_vorticity

__all__ = ["gaussian_random_field", "paper_forcing", "solve_vorticity"]
