"""sweep: which layers and tensors of a GGUF model are sensitive to reduced precision.

The pipeline (docs/architecture.md says what each module owns and where to add a format, a metric or an architecture):
  config      the configuration, defined once (schemas, choices), and `compose` for tests and benchmarks
  grid        expand and validate the whole grid before any job; planning: what it will cost
  job         one job: reuse the stored point or run it; records: the store, records, the gathered table
  reference   the model in its container + the text in windows, loaded by a `session.Session`
  targets     which tensor; formats / ggml_formats: which format; apply: how to apply it, with its proof
  run         one point: perturb, score (perplexity), compare with the matching baseline (metrics), record
  backend     the only module that talks to llama.cpp
"""

__version__ = "0.1.0"
