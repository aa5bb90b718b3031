"""`sweep formats`: print the tables of the formats (docs/formats.md); the registry itself is
sweep/quant/formats.py."""

from __future__ import annotations

import argparse

from ..quant.formats import markdown_ggml_table, markdown_table


def main(argv: list[str] | None = None) -> None:
    argparse.ArgumentParser(prog="sweep formats", description=__doc__.split(";")[0]).parse_args(argv)
    print(markdown_table(), markdown_ggml_table(), sep="\n\n")


if __name__ == "__main__":
    main()
