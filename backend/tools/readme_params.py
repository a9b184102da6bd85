"""The README's job parameter table, generated from `backend/job_params.py`.

    python -m backend.tools.readme_params           print the table
    python -m backend.tools.readme_params --write   replace the block in README.md
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from backend.job_params import JOB_PARAMS, markdown_table

README = Path(__file__).resolve().parents[2] / "README.md"
BLOCK = re.compile(r"(<!-- job-params:begin -->\n)(.*?)(<!-- job-params:end -->)", re.S)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m backend.tools.readme_params",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", action="store_true", help="update README.md in place")
    args = parser.parse_args(argv)
    table = markdown_table(JOB_PARAMS)
    if not args.write:
        print(table, end="")
        return 0
    text = README.read_text()
    if not BLOCK.search(text):
        raise SystemExit(f"{README}: no <!-- job-params:begin --> ... end block")
    README.write_text(BLOCK.sub(lambda m: m.group(1) + table + m.group(3), text))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
