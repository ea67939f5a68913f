"""Which versions of a model a Triton repository serves: list them, roll back, roll forward.

    python serve/versions.py --model-repository model_repository                  # list
    python serve/versions.py --model-repository model_repository --serve 1        # roll back to version 1
    python serve/versions.py --model-repository model_repository --serve latest   # the newest again

``--serve`` rewrites the model's ``version_policy`` in its ``config.pbtxt`` (atomically);
a running ``serve/launch.py`` sees the change within its poll interval and loads it
without a restart: the old version answers until the new choice is ready.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python serve/versions.py` from anywhere

from export.repository import versions, write_text_atomic
from export.triton_config import describe_version_policy, parse_pbtxt, to_pbtxt, version_policy


class VersionsError(RuntimeError):
    """The repository or the version asked for does not exist."""


def current(model_dir: Path) -> tuple[list[int], list[int], str]:
    """(versions on disk, versions the policy serves, the policy)."""
    config = model_dir / "config.pbtxt"
    if not config.exists():
        raise VersionsError(f"{model_dir}: no config.pbtxt (not a model of this repository?)")
    policy = parse_pbtxt(config.read_text()).version_policy
    on_disk = versions(model_dir)
    which = policy.WhichOneof("policy_choice")
    if which == "specific":
        served = [v for v in policy.specific.versions if v in on_disk]
    elif which == "all":
        served = on_disk
    else:
        served = on_disk[-(policy.latest.num_versions if which == "latest" else 1) :]
    return on_disk, served, describe_version_policy(policy)


def serve(model_dir: Path, choice: str) -> str:
    """Point ``model_dir``'s policy at ``choice`` ("latest" or a version number); returns the new policy."""
    on_disk = versions(model_dir)
    if choice == "latest":
        policy = "latest:1"
    elif choice.isdigit() and int(choice) in on_disk:
        policy = f"specific:{int(choice)}"
    else:
        listing = ", ".join(map(str, on_disk)) or "none"
        raise VersionsError(f"{model_dir.name} has no version {choice!r} (versions on disk: {listing})")
    config = model_dir / "config.pbtxt"
    cfg = parse_pbtxt(config.read_text())
    cfg.version_policy.CopyFrom(version_policy(policy))
    write_text_atomic(config, to_pbtxt(cfg))
    return policy


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-repository", required=True, type=Path)
    p.add_argument("--name", default="threegnet", help="the model (default threegnet)")
    p.add_argument("--serve", metavar="VERSION|latest", help="serve this version (rollback), or the newest again")
    args = p.parse_args(argv)
    model_dir = args.model_repository / args.name
    try:
        if args.serve is not None:
            policy = serve(model_dir, args.serve)
            print(
                f"{args.name}: version policy now {policy}; a running serve/launch.py loads it within its poll "
                "interval (2 s by default), the old version answering until then",
                file=sys.stderr,
            )
        on_disk, served, policy = current(model_dir)
    except VersionsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        f"{args.name}: versions {', '.join(map(str, on_disk)) or 'none'}; policy {policy}; "
        f"served: {', '.join(map(str, served)) or 'none'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
