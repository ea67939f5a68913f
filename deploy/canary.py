"""A new model version earns its traffic: a canary in the rehearsed fleet (deploy/local_fleet.py).

    python serve/versions.py --model-repository model_repository --serve 1     # the fleet pinned to its version
    python export/to_onnx.py --checkpoint new.pth.tar --output-dir model_repository   # writes 2/, served by nobody
    python deploy/canary.py --fleet FLEET_DIR watch --version 2      # canary, then promoted or rolled back
    python deploy/canary.py --fleet FLEET_DIR start --version 2      # or by hand: start, look, decide
    python deploy/canary.py --fleet FLEET_DIR status
    python deploy/canary.py --fleet FLEET_DIR promote                # or: abort

``FLEET_DIR`` is the folder a running ``deploy/local_fleet.py`` prints (its ``fleet.json``). Exit status:
0 done (``watch``: promoted), 3 ``watch`` rolled the canary back, 2 an error (the reason on stderr).

The least machinery on what exists: the shared ``config.pbtxt``'s ``version_policy`` (``serve/versions.py
--serve``) says what the stable replicas serve; a canary replica is pinned to the candidate in its own
pins file (``serve/launch.py --version-pins``), which its supervisor follows within a poll, loading the
candidate beside the old version (verified and smoke-tested as every version is) before unloading the old
one. HAProxy gives the canary a share of the traffic through server weights on its runtime API, set
before the pin, so the candidate never gets more than its share.

``watch`` judges the canary on Triton's own metrics of the candidate version on the canary's metrics
port: failed requests (``nv_inference_request_failure``) against ``nv_inference_request_success``, and
the p99 latency (``nv_inference_request_summary_us``, the launcher turns the summaries on) against the
stable replicas'. A breach at any look rolls it back at once: the canary's weight goes to 0 first (it
gets no new request), then its pin goes and it loads the stable version again, then its weight comes
back. A canary that holds for the whole window, over enough requests, is promoted: the shared policy
names the candidate, every replica loads it (no request fails: the old version answers until the new one
is ready), the pin goes and the weights come back. What the canary fails is bounded: at most
``max(min_failures, max_error_rate x its requests)`` before a look sees it, plus what its share of the
traffic sends it in one look (``tick_s``), plus the requests in flight at the canary when its weight
goes to 0. In Kubernetes the same roles are a canary Deployment and an Ingress weight (docs/deploy.md).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import re
import socket
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from serve.endpoints import METRICS_PATH
from serve.supervisor import read_pins
from serve.versions import VersionsError, current, serve

STABLE_WEIGHT = 100  # HAProxy weights during a canary (at most 256); the initial weights come back after it
STATE_FILE = "canary.json"
_SAMPLE = re.compile(r"^(\w+)\{([^}]*)\}\s+(\S+)$")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


class CanaryError(RuntimeError):
    """The canary cannot start or end as asked."""


@dataclass(frozen=True)
class Member:
    """One replica, as the controller reaches it: no operators' key needed (metrics and metadata)."""

    name: str
    http_port: int
    metrics_port: int
    pins: Path


@dataclass(frozen=True)
class FleetView:
    """What the controller needs of a running fleet (``deploy/local_fleet.py`` writes it as fleet.json)."""

    repository: Path
    haproxy_socket: Path
    backends: tuple[str, ...]
    replicas: tuple[Member, ...]
    work: Path

    @classmethod
    def load(cls, where: Path) -> FleetView:
        """From a fleet's folder or its fleet.json."""
        path = where / "fleet.json" if where.is_dir() else where
        try:
            spec = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise CanaryError(f"{path}: not a running fleet's description ({e})") from None
        members = tuple(Member(r["name"], r["http_port"], r["metrics_port"], Path(r["pins"])) for r in spec["replicas"])
        return cls(Path(spec["repository"]), Path(spec["haproxy_socket"]), tuple(spec["backends"]), members,
                   path.parent)  # fmt: skip

    def admin(self, command: str) -> str:
        """A command on HAProxy's runtime API."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(str(self.haproxy_socket))
            s.sendall(command.encode() + b"\n")
            return s.makefile().read()

    def states(self, member: Member) -> set[str]:
        """HAProxy's status of ``member`` in every backend: UP, DOWN, ..."""
        rows = csv.DictReader(io.StringIO(self.admin("show stat").lstrip("# ")))
        return {row["status"].split()[0] for row in rows
                if row["pxname"] in self.backends and row["svname"] == member.name}  # fmt: skip

    def set_weight(self, member: Member, weight: int | str) -> None:
        for backend in self.backends:
            answer = self.admin(f"set server {backend}/{member.name} weight {weight}").strip()
            if answer:
                raise CanaryError(f"HAProxy refused the weight {weight} for {backend}/{member.name}: {answer}")


@dataclass
class Thresholds:
    """When a canary is rolled back, and when it has earned its promotion."""

    window_s: float = 60.0  # it must hold this long ...
    min_requests: int = 100  # ... over at least this many of its requests
    max_error_rate: float = 0.01  # failed / all the candidate's requests
    min_failures: int = 3  # a breach of the rate needs at least this many failures (one is not a trend)
    max_p99_ratio: float = 2.0  # its p99 against the stable replicas' ...
    min_p99_ms: float = 250.0  # ... but a p99 under this is never a breach (noise on small numbers)
    tick_s: float = 1.0  # between looks
    patience_s: float = 600.0  # without enough requests by then: rolled back (nothing to judge it on)


@dataclass
class CanaryState:
    """A canary under way (the fleet's canary.json): what ``status``, ``promote`` and ``abort`` work on."""

    model: str
    version: int
    stable: list[int]
    canaries: list[str]
    share: float
    started: float  # time.time() the canaries began serving the candidate
    baseline: dict[str, list[float]] = field(default_factory=dict)  # replica -> [success, failure] at the start


@dataclass
class Verdict:
    """One look at the canary."""

    requests: int
    failures: int
    p99_ms: float | None
    stable_p99_ms: float | None
    elapsed_s: float
    breach: str | None = None  # why it must be rolled back
    earned: bool = False  # held for the window over enough requests

    def line(self) -> str:
        p99 = "-" if self.p99_ms is None else f"{self.p99_ms:.0f} ms"
        stable = "-" if self.stable_p99_ms is None else f"{self.stable_p99_ms:.0f} ms"
        rate = self.failures / self.requests if self.requests else 0.0
        verdict = f"; BREACH: {self.breach}" if self.breach else ("; held for the window" if self.earned else "")
        return (f"+{self.elapsed_s:.0f} s: {self.requests} requests, {self.failures} failed ({rate:.1%}), "
                f"p99 {p99} (stable {stable}){verdict}")  # fmt: skip


def metrics(member: Member, timeout: float = 5) -> list[tuple[str, dict[str, str], float]]:
    """Triton's metrics on ``member``'s metrics port: (name, labels, value)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{member.metrics_port}{METRICS_PATH}", timeout=timeout) as r:
        text = r.read().decode()
    samples = []
    for line in text.splitlines():
        if (m := _SAMPLE.match(line)) is not None:
            samples.append((m.group(1), dict(_LABEL.findall(m.group(2))), float(m.group(3))))
    return samples


def counts(member: Member, model: str, version: int) -> tuple[float, float, float | None]:
    """(requests answered, requests failed, p99 in ms or None) of ``model`` ``version`` on ``member``."""
    success = failure = 0.0
    p99 = None
    for name, labels, value in metrics(member):
        if labels.get("model") != model or labels.get("version") != str(version):
            continue
        if name == "nv_inference_request_success":
            success += value
        elif name == "nv_inference_request_failure":  # one row per reason
            failure += value
        elif name == "nv_inference_request_summary_us" and labels.get("quantile") == "0.99" and not math.isnan(value):
            p99 = value / 1000
    return success, failure, p99


def served_versions(member: Member, model: str, timeout: float = 5) -> list[int]:
    """The versions of ``model`` ready on ``member`` (its model metadata: data plane, no key)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{member.http_port}/v2/models/{model}", timeout=timeout) as r:
            return sorted(int(v) for v in json.loads(r.read()).get("versions", []))
    except (OSError, ValueError):
        return []


def write_pins(member: Member, pins: dict[str, int]) -> None:
    """Atomically: the supervisor may read it at any moment."""
    tmp = member.pins.with_name(f".{member.pins.name}.tmp")
    tmp.write_text("".join(f"{model} {version}\n" for model, version in sorted(pins.items())))
    tmp.replace(member.pins)


def weights_for(share: float, canaries: int, stable: int) -> int:
    """Each canary's HAProxy weight for ``share`` of the traffic when each stable replica weighs STABLE_WEIGHT."""
    if not 0 < share < 1:
        raise CanaryError(f"the canary's share must be between 0 and 1, not {share}")
    weight = round(share * stable * STABLE_WEIGHT / (canaries * (1 - share)))
    if not 1 <= weight <= 256:
        raise CanaryError(f"a share of {share:.0%} on {canaries} of {canaries + stable} replicas needs weight {weight} "
                          "(HAProxy takes 1-256): choose a share closer to the canaries' headcount")  # fmt: skip
    return weight


class Canary:
    """Start, judge, promote or roll back a canary on a running fleet; see the module doc."""

    def __init__(self, fleet: FleetView, log: Callable[[str], None] = print) -> None:
        self.fleet, self.log = fleet, log
        self.state_file = fleet.work / STATE_FILE

    # -- state ----------------------------------------------------------------------------
    def state(self) -> CanaryState | None:
        try:
            return CanaryState(**json.loads(self.state_file.read_text()))
        except FileNotFoundError:
            return None

    def _save(self, state: CanaryState) -> None:
        tmp = self.state_file.with_name(f".{STATE_FILE}.tmp")
        tmp.write_text(json.dumps(asdict(state), indent=1))
        tmp.replace(self.state_file)

    def _member(self, name: str) -> Member:
        for m in self.fleet.replicas:
            if m.name == name:
                return m
        raise CanaryError(f"no replica {name!r} in the fleet ({', '.join(m.name for m in self.fleet.replicas)})")

    def _wait_serving(
        self, members: list[Member], model: str, versions: list[int], timeout: float, exactly: bool = True
    ) -> None:
        """Until every member serves ``versions`` (``exactly``: and no other)."""
        deadline = time.monotonic() + timeout

        def done(m: Member) -> bool:
            served = served_versions(m, model)
            return served == versions if exactly else set(versions) <= set(served)

        while not all(done(m) for m in members):
            if time.monotonic() > deadline:
                now = {m.name: served_versions(m, model) for m in members}
                raise CanaryError(f"{model}: still serving {now} after {timeout:.0f} s, wanted {versions} (the "
                                  "replicas' logs say why: a refused version is logged with its reason)")  # fmt: skip
            time.sleep(0.25)

    def _wait_up(self, members: list[Member], timeout: float) -> None:
        """Until HAProxy has every member in its pool: Triton's strict readiness is false while a version
        loads or unloads, so a replica still settling must not be the only one left when others start loading."""
        deadline = time.monotonic() + timeout
        while not all(self.fleet.states(m) == {"UP"} for m in members):
            if time.monotonic() > deadline:
                raise CanaryError(f"not every replica is in HAProxy's pool: {[self.fleet.states(m) for m in members]}")
            time.sleep(0.25)

    # -- start ----------------------------------------------------------------------------
    def start(
        self, version: int, model: str = "threegnet", share: float = 0.1, canaries: list[str] | None = None,
        timeout: float = 300,
    ) -> CanaryState:  # fmt: skip
        """Give ``canaries`` (default: the last replica) ``share`` of the traffic, then pin them to ``version``."""
        if (state := self.state()) is not None:
            raise CanaryError(f"a canary of {state.model} version {state.version} is under way: promote or abort it")
        try:
            on_disk, stable, policy = current(self.fleet.repository / model)
        except VersionsError as e:
            raise CanaryError(str(e)) from None
        if version not in on_disk:
            raise CanaryError(f"{model} has no version {version} on disk (versions: {on_disk})")
        if version in stable:
            raise CanaryError(
                f"the repository's policy ({policy}) serves version {version} to every replica already: pin the "
                f"fleet first (python serve/versions.py --model-repository {self.fleet.repository} --name {model} "
                f"--serve {stable[-1] if stable else 'N'}), export, then start the canary"
            )
        members = [self._member(n) for n in canaries] if canaries else [self.fleet.replicas[-1]]
        others = [m for m in self.fleet.replicas if m not in members]
        if not others:
            raise CanaryError("a canary needs at least one stable replica beside it")
        weight = weights_for(share, len(members), len(others))
        self._wait_up(others, timeout)  # they carry the traffic while the canary loads the candidate
        baseline = {m.name: list(counts(m, model, version)[:2]) for m in members}
        state = CanaryState(model, version, stable, [m.name for m in members], share, time.time(), baseline)
        self._save(state)
        for m in others:
            self.fleet.set_weight(m, STABLE_WEIGHT)
        for m in members:  # the weight before the pin: the candidate never gets more than its share
            self.fleet.set_weight(m, weight)
        for m in members:
            write_pins(m, {**read_pins(m.pins), model: version})
        self.log(f"[canary] {', '.join(state.canaries)}: weight {weight} against {STABLE_WEIGHT} ({share:.0%} of the "
                 f"traffic), pinned to {model} version {version}; stable: version {_listed(stable)}")  # fmt: skip
        try:  # judged from the moment it can answer (the old version goes a moment later)
            self._wait_serving(members, model, [version], timeout, exactly=False)
        except CanaryError as e:
            self.log(f"[canary] {e}; rolling back")
            self.abort(f"the canary did not load version {version}")
            raise
        state.started = time.time()  # the window counts from here: the candidate serves its share
        self._save(state)
        self.log(f"[canary] {', '.join(state.canaries)} serving {model} version {version}")
        return state

    # -- judge ----------------------------------------------------------------------------
    def look(self, thresholds: Thresholds) -> Verdict:
        """The canary's numbers since its start, and whether they breach ``thresholds`` or earned it the fleet."""
        state = self.state()
        if state is None:
            raise CanaryError("no canary under way")
        requests = failures = 0.0
        p99s = []
        for name in state.canaries:
            try:
                success, failure, p99 = counts(self._member(name), state.model, state.version)
            except OSError as e:  # a canary whose Triton died (the fleet restarts it) is judged by that
                elapsed = time.time() - state.started
                return Verdict(int(requests), int(failures), None, None, elapsed, f"{name} does not answer: {e}")
            base = state.baseline.get(name, [0.0, 0.0])
            requests += success - base[0] + failure - base[1]
            failures += failure - base[1]
            if p99 is not None:
                p99s.append(p99)
        stable_p99s = []
        for m in self.fleet.replicas:
            if m.name not in state.canaries:
                for v in state.stable:
                    try:
                        if (p99 := counts(m, state.model, v)[2]) is not None:
                            stable_p99s.append(p99)
                    except OSError:
                        pass  # the canary is judged against the stable replicas that answer
        p99 = max(p99s) if p99s else None
        stable_p99 = max(stable_p99s) if stable_p99s else None
        verdict = Verdict(int(requests), int(failures), p99, stable_p99, time.time() - state.started)
        t = thresholds
        if failures >= t.min_failures and failures > t.max_error_rate * requests:
            verdict.breach = f"{int(failures)} of {int(requests)} requests failed (limit {t.max_error_rate:.1%})"
        elif p99 is not None and requests >= t.min_requests:
            limit = max(t.min_p99_ms, t.max_p99_ratio * stable_p99) if stable_p99 is not None else t.min_p99_ms
            if p99 > limit:
                verdict.breach = f"p99 {p99:.0f} ms over {limit:.0f} ms"
        if verdict.breach is None and requests < t.min_requests and verdict.elapsed_s > t.patience_s:
            verdict.breach = f"only {int(requests)} requests in {verdict.elapsed_s:.0f} s: too few to judge it"
        verdict.earned = verdict.breach is None and verdict.elapsed_s >= t.window_s and requests >= t.min_requests
        return verdict

    def watch(self, thresholds: Thresholds) -> tuple[bool, Verdict]:
        """Look every ``tick_s`` until a breach (rolled back: False) or the window held (promoted: True)."""
        while True:
            verdict = self.look(thresholds)
            if verdict.breach is not None or verdict.earned:
                self.log(f"[canary] {verdict.line()}")
                break
            self.log(f"[canary] {verdict.line()}")
            time.sleep(thresholds.tick_s)
        if verdict.breach is not None:
            self.abort(verdict.breach)
            return False, verdict
        self.promote()
        return True, verdict

    # -- end ------------------------------------------------------------------------------
    def promote(self, timeout: float = 300) -> None:
        """Every replica serves the candidate: the shared policy names it, then the pins and weights go."""
        state = self.state()
        if state is None:
            raise CanaryError("no canary under way")
        members = [self._member(n) for n in state.canaries]
        # The canaries settled (the old version gone) and in the pool: they carry the traffic while the others load.
        self._wait_serving(members, state.model, [state.version], timeout)
        self._wait_up(members, timeout)
        serve(self.fleet.repository / state.model, str(state.version))
        self.log(f"[canary] promoting {state.model} version {state.version}: the repository's policy is now "
                 f"specific:{state.version}")  # fmt: skip
        self._wait_serving(list(self.fleet.replicas), state.model, [state.version], timeout)
        self._unpin(state)
        for m in self.fleet.replicas:
            self.fleet.set_weight(m, "100%")
        self.state_file.unlink()
        self.log(f"[canary] promoted: every replica serves {state.model} version {state.version}")

    def abort(self, why: str = "by hand", timeout: float = 300) -> None:
        """The canaries out of the traffic at once, back on the stable version, then back in."""
        state = self.state()
        if state is None:
            raise CanaryError("no canary under way")
        members = [self._member(n) for n in state.canaries]
        for m in members:
            self.fleet.set_weight(m, 0)
        self.log(f"[canary] rolling back {state.model} version {state.version} ({why}): "
                 f"{', '.join(state.canaries)} out of the traffic")  # fmt: skip
        self._unpin(state)
        stable = current(self.fleet.repository / state.model)[1]
        self._wait_serving(members, state.model, stable, timeout)
        for m in self.fleet.replicas:
            self.fleet.set_weight(m, "100%")
        self.state_file.unlink()
        self.log(f"[canary] rolled back: every replica serves {state.model} version {_listed(stable)}")

    def _unpin(self, state: CanaryState) -> None:
        for name in state.canaries:
            m = self._member(name)
            write_pins(m, {k: v for k, v in read_pins(m.pins).items() if k != state.model})


def _listed(versions: list[int]) -> str:
    return ", ".join(map(str, versions)) or "none"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--fleet", required=True, type=Path, help="the running fleet's folder (deploy/local_fleet.py prints it)"
    )
    sub = p.add_subparsers(dest="command", required=True)
    for name in ("start", "watch"):
        c = sub.add_parser(name, help="start a canary" if name == "start" else "start one (unless under way), "
                           "judge it, then promote or roll it back")  # fmt: skip
        c.add_argument("--version", type=int, required=name == "start", help="the candidate version")
        c.add_argument("--model", default="threegnet")
        c.add_argument("--share", type=float, default=0.1, help="of the traffic for the canary (default 0.1)")
        c.add_argument("--replica", action="append", help="the canary replica(s) (default: the last one)")
    d = Thresholds()
    w = sub.choices["watch"]
    w.add_argument("--window", type=float, default=d.window_s, help=f"seconds it must hold (default {d.window_s:.0f})")
    w.add_argument("--min-requests", type=int, default=d.min_requests)
    w.add_argument("--max-error-rate", type=float, default=d.max_error_rate)
    w.add_argument("--min-failures", type=int, default=d.min_failures)
    w.add_argument("--max-p99-ratio", type=float, default=d.max_p99_ratio, help="against the stable replicas' p99")
    w.add_argument("--min-p99-ms", type=float, default=d.min_p99_ms, help="a p99 under this is never a breach")
    sub.add_parser("status", help="the canary's numbers so far")
    sub.add_parser("promote", help="every replica serves the candidate")
    sub.add_parser("abort", help="the canary goes back to the stable version")
    args = p.parse_args(argv)
    try:
        canary = Canary(FleetView.load(args.fleet), log=lambda line: print(line, file=sys.stderr, flush=True))
        if args.command == "start":
            canary.start(args.version, args.model, args.share, args.replica)
        elif args.command == "watch":
            if canary.state() is None:
                if args.version is None:
                    p.error("watch needs --version when no canary is under way")
                canary.start(args.version, args.model, args.share, args.replica)
            thresholds = Thresholds(args.window, args.min_requests, args.max_error_rate, args.min_failures,
                                    args.max_p99_ratio, args.min_p99_ms)  # fmt: skip
            promoted, _ = canary.watch(thresholds)
            return 0 if promoted else 3
        elif args.command == "status":
            state = canary.state()
            if state is None:
                print("no canary under way")
                return 0
            print(f"{', '.join(state.canaries)}: {state.model} version {state.version} at {state.share:.0%} of the "
                  f"traffic, stable version {_listed(state.stable)}; {canary.look(Thresholds()).line()}")  # fmt: skip
        elif args.command == "promote":
            canary.promote()
        else:
            canary.abort()
    except (CanaryError, VersionsError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
