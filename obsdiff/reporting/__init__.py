"""Reports of sweeps: run records collected, tables, plots and image grids."""
