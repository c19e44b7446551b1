"""merge_engine stays pure torch: it imports and merges with vLLM, gRPC and the server blocked."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from loramerge.merge_engine import METHODS


def test_merge_engine_never_imports_vllm_grpc_or_the_server() -> None:
    program = textwrap.dedent(
        """
        import sys
        BLOCKED = ("vllm", "grpc", "loramerge.server", "loramerge.v1", "transformers", "peft")

        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.startswith(BLOCKED):
                    raise ImportError(f"merge_engine must not import {name}")
                return None

        sys.meta_path.insert(0, Block())
        import torch
        from loramerge.merge_engine import METHODS
        from loramerge.merge_engine.linalg import factored_svd
        u, s, v = factored_svd(torch.randn(2, 8, 3), torch.randn(2, 3, 6))
        print(len(METHODS.names()), tuple(s.shape))
        """
    )
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [str(len(METHODS.names())), "(2,", "3)"]
