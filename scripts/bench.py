"""Benchmarks ToMA against the baseline and tomesd: same as `toma-export bench` (see its --help)."""
import sys

from toma_export.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
