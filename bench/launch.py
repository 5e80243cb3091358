"""`publer-proxy serve` from another checkout, to measure a change side by side.

Usage: python bench/launch.py VARIANT serve --config PATH

Variants:
  shipped          the code of this checkout
  tree:PATH        the `proxy` package of another checkout at PATH (for instance the
                   commit before a change), everything else equal
"""

from __future__ import annotations

import sys

VARIANTS = ("shipped",)


def main() -> int:
    """Put the variant's `proxy` package first on the path, then run the proxy's CLI."""
    variant, argv = sys.argv[1], sys.argv[2:]
    if variant.startswith("tree:"):
        sys.path.insert(0, variant.removeprefix("tree:"))
        variant = "shipped"
    if variant not in VARIANTS:
        raise SystemExit(f"launch: unknown variant {variant!r}; shipped or tree:PATH")
    from proxy.cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
