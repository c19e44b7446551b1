"""Generate the loramerge.v1 stubs from the repository's proto/ into loramerge_client/v1
(imports rewritten to that package). Run by setup.py on every build, and by `make proto`
(`python clients/python/build_stubs.py`) after a .proto file changed.

The generated files keep the proto file names (loramerge/v1/*.proto), so they share one
descriptor with the server's `loramerge.v1` stubs when both are imported in one process.
"""

from __future__ import annotations

import os
import re
import tempfile
from importlib import resources
from pathlib import Path

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
        generated = {"__init__.py": '"""Generated gRPC stubs of loramerge.v1 (from proto/)."""\n'}
        for path in sorted((Path(scratch) / PACKAGE).iterdir()):
            generated[path.name] = IMPORT.sub("from loramerge_client.v1 import ", path.read_text())
    _update(target, generated)


def _update(target: Path, files: dict[str, str]) -> None:
    """Make `target` hold exactly `files`, rewriting only what changed, each file replaced
    atomically: a process importing the stubs meanwhile never sees a missing or half file."""
    target.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        path = target / name
        if not path.exists() or path.read_text() != text:
            partial = path.with_name(f".{name}.partial")
            partial.write_text(text)
            os.replace(partial, path)
    for path in target.iterdir():
        if path.is_file() and path.name not in files:
            path.unlink()


if __name__ == "__main__":
    generate_stubs(HERE / "loramerge_client" / "v1")
