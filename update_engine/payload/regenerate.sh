#!/usr/bin/env bash
# Regenerate update_metadata_pb2.py and update_metadata_pb2.pyi from update_metadata.proto.
#
# The generator is pinned to grpcio-tools 1.51 (protoc 21): its output imports with Debian bookworm's
# python3-protobuf 4.21 as well as with current protobuf releases, whereas a newer protoc emits an import of
# google.protobuf.runtime_version that bookworm's library lacks. The pinned tools live in a throwaway venv.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
venv="${PROTOC_VENV:-/tmp/protoc-venv}"
python="${PYTHON:-python3}"

if [ ! -x "$venv/bin/python" ]; then
    "$python" -m venv "$venv"
fi
"$venv/bin/pip" install -q 'grpcio-tools==1.51.*'

cd "$here"
"$venv/bin/python" -m grpc_tools.protoc \
    --proto_path=. \
    --python_out=. \
    --pyi_out=. \
    update_metadata.proto
# The generated stub leaves Mapping unparameterised, which mypy --strict reports; the stub is not ours to fix.
sed -i '1i # mypy: disable-error-code="type-arg"' update_metadata_pb2.pyi
echo "regenerated $here/update_metadata_pb2.py and update_metadata_pb2.pyi"
