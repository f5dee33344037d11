"""A sampler, a model and a reward defined outside the package, each one file with one registry line."""
