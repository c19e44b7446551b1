"""Build hook: the loramerge.v1 stubs are generated from ../../proto (build_stubs.py) before
every setuptools step (metadata, wheel, editable), so nothing is committed twice."""

import sys
from pathlib import Path

from setuptools import setup

sys.path.insert(0, str(Path(__file__).resolve().parent))
from build_stubs import HERE, generate_stubs

generate_stubs(HERE / "loramerge_client" / "v1")
setup()
