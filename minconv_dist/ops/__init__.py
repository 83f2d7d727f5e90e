"""Numerical kernels: the gate rules of the Min cells and the linear-recurrence scans."""
