"""Write rules.yml, the plain Prometheus rules file, from prometheus-rule.yaml's spec (the one source).

python deploy/kubernetes/monitoring/generate_rules.py          # after editing prometheus-rule.yaml
python deploy/kubernetes/monitoring/generate_rules.py --check  # exit 1 if rules.yml is out of date
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "prometheus-rule.yaml"
RULES = HERE / "rules.yml"
HEADER = (
    "# Generated from prometheus-rule.yaml (its spec) by generate_rules.py: edit that file, then run it.\n"
    "# A plain Prometheus rules file: what the rehearsal's Prometheus loads and promtool tests.\n"
)


class _Dumper(yaml.SafeDumper):
    pass


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|" if "\n" in value else None)


_Dumper.add_representer(str, _str)


def rules_text() -> str:
    spec = yaml.safe_load(SOURCE.read_text())["spec"]
    return HEADER + yaml.dump(spec, Dumper=_Dumper, sort_keys=False, width=100_000)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="only check that rules.yml is up to date")
    args = p.parse_args(argv)
    if args.check:
        if not RULES.exists() or RULES.read_text() != rules_text():
            print(f"{RULES} is out of date: run {Path(__file__).name}", file=sys.stderr)
            return 1
        return 0
    RULES.write_text(rules_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
