"""Performance: speed, overhead and memory of the scorer and of sweeps, against llama.cpp's own tool."""
