"""Rewrite arexport/cli_catalog.json from the live registries (methods and their options, model names).

The CLI reads that file for its options and --help so that `arexport --help` does not import torch;
tests/test_newcomer.py fails when the file and the registries differ. Run after adding a method, a
method option or a model name:

    python scripts/write_cli_catalog.py
"""

import json

from arexport.cli import CATALOG_FILE, live_catalog

if __name__ == "__main__":
    CATALOG_FILE.write_text(json.dumps(live_catalog(), indent=1) + "\n", encoding="utf-8")
    print(f"wrote {CATALOG_FILE}")
