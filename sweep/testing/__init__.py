"""Helpers for the tests and the benchmarks: tiny random-weight GGUF models written with gguf's writer."""
