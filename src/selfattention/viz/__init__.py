"""Pictures of attention. Plotting libraries are imported inside the functions that need them."""
