"""Build hook: generate the loramerge.v1 stubs from the repository's proto/ into
loramerge_client/v1 (imports rewritten to that package), so nothing is committed twice.

The generated files keep the proto file names (loramerge/v1/*.proto), so they share one
descriptor with the server's `loramerge.v1` stubs when both are imported in one process.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from importlib import resources
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).resolve().parent
PROTO_ROOT = HERE.parent.parent / "proto"
PACKAGE = "loramerge/v1"
IMPORT = re.compile(r"^from loramerge\.v1 import ", re.MULTILINE)


def generate_stubs(target: Path) -> None:
    """protoc loramerge/v1/*.proto → `target` (a package: __init__.py, *_pb2.py(i), *_grpc.py)."""
    from grpc_tools import protoc

    protos = sorted((PROTO_ROOT / PACKAGE).glob("*.proto"))
    if not protos:
        raise SystemExit(
            f"loramerge-client: no .proto files under {PROTO_ROOT / PACKAGE}; build from a "
            "checkout of the loramerge repository (pip install ./clients/python)"
        )
    well_known = resources.files("grpc_tools") / "_proto"
    with tempfile.TemporaryDirectory() as scratch:
        code = protoc.main(
            ["protoc", f"-I{PROTO_ROOT}", f"-I{well_known}", f"--python_out={scratch}",
             f"--pyi_out={scratch}", f"--grpc_python_out={scratch}", *map(str, protos)]
        )  # fmt: skip
        if code != 0:
            raise SystemExit(f"loramerge-client: protoc failed ({code})")
        if target.exists():
            shutil.rmtree(target)
        target.mkdir(parents=True)
        (target / "__init__.py").write_text(
            '"""Generated gRPC stubs of loramerge.v1 (from proto/loramerge/v1)."""\n'
        )
        for path in sorted((Path(scratch) / PACKAGE).iterdir()):
            text = IMPORT.sub("from loramerge_client.v1 import ", path.read_text())
            (target / path.name).write_text(text)


# Every setuptools step (metadata, wheel, editable) needs the package directory: generate it
# next to the sources (git-ignored) before setup() runs.
generate_stubs(HERE / "loramerge_client" / "v1")
setup()
