"""Training: state, loss, the jitted step, and the loop (the only I/O)."""
