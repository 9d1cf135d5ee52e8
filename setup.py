"""Build glue: the cffi extension xlegacy._ffi is compiled from csrc/ at install time."""
from setuptools import setup

setup(cffi_modules=["csrc/build_ffi.py:ffibuilder"])
