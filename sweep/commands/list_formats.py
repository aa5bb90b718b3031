"""`sweep formats` (or `sweep formats`): print the tables of the formats (docs/formats.md); the registry
itself is sweep/quant/formats.py."""

from ..quant.formats import markdown_ggml_table, markdown_table


def main() -> None:
    print(markdown_table(), markdown_ggml_table(), sep="\n\n")


if __name__ == "__main__":
    main()
