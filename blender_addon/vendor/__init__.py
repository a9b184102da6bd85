"""The backend modules the add-on shares with the backend: numpy, pyzmq and the standard
library only, so they run inside Blender's own Python.

The repository holds one copy of each, in `backend/`. `python3 build.py addon` copies them
into this folder of the extension zip; run from a checkout (tests, development, an add-on
folder linked into Blender), this package reads them from the checkout's `backend/` folder.
"""

from pathlib import Path

# build.py reads this list
SHARED_MODULES = ("protocol", "client", "gaussians", "job_params", "rigs")

_HERE = Path(__file__).resolve().parent
_CHECKOUT_BACKEND = _HERE.parent.parent / "backend"

if not (_HERE / "protocol.py").is_file():
    if not (_CHECKOUT_BACKEND / "protocol.py").is_file():
        raise ImportError(
            f"the add-on's shared backend modules are missing: neither {_HERE} (an extension "
            f"built by `python3 build.py addon`) nor {_CHECKOUT_BACKEND} (a checkout) has them")
    __path__.append(str(_CHECKOUT_BACKEND))
