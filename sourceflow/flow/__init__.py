"""Flow-matching core: what to regress (path, time), where the flow starts (sources), how noise is
paired with data (couplings), how to integrate (solvers) and guidance combinators."""
