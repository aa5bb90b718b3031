"""Model builders: GGUFs with the shapes of models people quantize, random weights, for the benchmarks."""
