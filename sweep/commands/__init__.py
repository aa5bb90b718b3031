"""The command line: `sweep` and its subcommands (cli: one table, one --help), each a module with a `main()`:
score_model (`sweep score`), list_formats (`sweep formats`), rpc_server (`sweep rpc-server`), prefix_clean
(`sweep prefix-clean`). The sweep itself is `python -m sweep` (sweep/__main__.py); the tools keep their own
`python -m sweep.recipe|report|imatrix`."""
