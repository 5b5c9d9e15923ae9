"""Regenerate the Python code for the protos: `python protos/generate.py`.

Writes messages (`*_pb2.py` with `.pyi`) and gRPC stubs (`*_pb2_grpc.py` with `.pyi`, from
mypy-protobuf) into authz_server/generated/. protoc writes imports as `from medwallet.v1 import`,
which only works if `medwallet` is a top-level package; we rewrite them to the package we ship in,
as temporalio's gen_protos does. Never edit the output by hand: tests/test_codegen.py fails when it
differs from what this script writes.
"""

from __future__ import annotations

import re
import shutil
import sys
import tempfile
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent
REPO_ROOT = PROTO_ROOT.parent
OUTPUT_PACKAGE = "authz_server.generated"
OUTPUT_DIR = REPO_ROOT / "authz_server" / "generated"
IMPORT_PATTERN = re.compile(r"^(from|import) medwallet\.v1", re.MULTILINE)


def generate(output_dir: Path) -> list[Path]:
    """Runs protoc into output_dir and fixes imports; returns the files written."""
    from grpc_tools import protoc  # imported here: a dev-only dependency

    proto_files = sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.rglob("*.proto"))
    include = Path(protoc.__file__).resolve().parent / "_proto"
    with tempfile.TemporaryDirectory() as raw:
        arguments = [
            "grpc_tools.protoc",
            f"--proto_path={PROTO_ROOT}",
            f"--proto_path={include}",
            f"--python_out={raw}",
            f"--grpc_python_out={raw}",
            f"--mypy_out={raw}",
            f"--mypy_grpc_out={raw}",
            *proto_files,
        ]
        plugin_dir = str(Path(sys.executable).parent)
        import os

        os.environ["PATH"] = plugin_dir + os.pathsep + os.environ.get("PATH", "")
        if protoc.main(arguments) != 0:
            raise SystemExit("protoc failed")
        if output_dir.exists():
            shutil.rmtree(output_dir)
        shutil.copytree(raw, output_dir)
    written = []
    for path in sorted(output_dir.rglob("*")):
        if path.suffix in (".py", ".pyi"):
            text = IMPORT_PATTERN.sub(rf"\1 {OUTPUT_PACKAGE}.medwallet.v1", path.read_text())
            path.write_text(text)
            written.append(path)
    for package in (output_dir, *[p for p in output_dir.rglob("*") if p.is_dir()]):
        init = package / "__init__.py"
        if not init.exists():
            init.write_text("")
            written.append(init)
    return written


if __name__ == "__main__":
    files = generate(OUTPUT_DIR)
    print(f"wrote {len(files)} files under {OUTPUT_DIR.relative_to(REPO_ROOT)}")
