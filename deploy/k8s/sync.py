"""Regenerate the files of deploy/k8s/base that copy a source elsewhere in deploy/, since
kustomize reads files only below a kustomization's directory:

- base/loramerge.yaml       = deploy/loramerge.example.yaml (the ConfigMap), byte for byte
- base/prometheusrule.yaml  = deploy/alerts/loramerge.rules.yaml wrapped in a PrometheusRule

`python deploy/k8s/sync.py` writes them (`make k8s-config`); `--check` only reports stale ones
(exit 1), as the tests do.
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

DEPLOY = Path(__file__).resolve().parent.parent
BASE = DEPLOY / "k8s" / "base"


def expected() -> dict[Path, str]:
    """Each generated file and the text it must have."""
    rules = yaml.safe_load((DEPLOY / "alerts" / "loramerge.rules.yaml").read_text())
    rule = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "loramerge"},
        "spec": {"groups": rules["groups"]},
    }
    header = "# Generated from deploy/alerts/loramerge.rules.yaml by deploy/k8s/sync.py.\n"
    return {
        BASE / "loramerge.yaml": (DEPLOY / "loramerge.example.yaml").read_text(),
        BASE / "prometheusrule.yaml": header + yaml.safe_dump(rule, sort_keys=False, width=100),
    }


def main(argv: list[str]) -> int:
    stale = [
        path for path, text in expected().items() if not path.exists() or path.read_text() != text
    ]
    if "--check" in argv:
        for path in stale:
            print(f"{path.relative_to(DEPLOY.parent)} is stale: run `make k8s-config`")
        return 1 if stale else 0
    for path, text in expected().items():
        path.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
