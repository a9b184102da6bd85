"""Copies of the backend's `protocol`, `client` and `gaussians` modules (numpy, pyzmq and the
standard library only), kept byte-identical to `backend/` by `python3 build.py addon`."""
