"""Development tools beside the served backend: benchmarks (`bench/`) and the headless demo.

Not part of the installed package (pyproject excludes `backend.tools*`); run from a checkout
through `python3 build.py bench|demo`. Serving code never imports them.
"""
