"""Rollouts: following the model repository, serving only verified versions, honouring pins.

* **Rollouts.** The model repository is polled every ``poll_secs``: a model folder
  whose files changed (a new version exported, a config rewritten by
  ``serve/versions.py``) and then stayed unchanged for one more poll is loaded again.
  Triton loads the new version beside the old one, which answers until the new one
  is ready: no request fails. Stand-in models get their shadow refreshed first.
* **Only verified versions.** Triton keeps a version whose load failed in its index as
  UNAVAILABLE with the failure as its reason, and its strict readiness is false while
  any version of any model is neither READY nor "unloaded": one broken version made
  the whole server not ready, for good, though the old version answered (later loads,
  even of other versions, leave that state as it is). So Triton never picks versions
  of an ONNX model by itself: the supervisor loads an explicit version list, a config
  override with a ``specific`` policy, holding only versions that passed
  ``serve/versions.py --check`` (complete per their completion record, labels present,
  onnxruntime serves them under the config: in a child process, so a file that crashes
  onnxruntime cannot crash the launcher) and then, loaded beside the serving version,
  answered a smoke inference in Triton itself. A refused version is logged, counted
  (``rejected``) and not tried again until its files change; the policy then picks
  among the remaining versions (``latest:1``: the newest verified one). The same
  happens at startup (:meth:`RepositoryFollower.prepare`): Triton's shadow of the repository holds
  only the verified versions (also later: an ensemble's load reloads the models under it from disk).
* **Version pins (canaries).** ``pins``, a file of ``MODEL VERSION`` lines read on every poll,
  overrides the ``version_policy`` of those models on this server alone: replicas sharing one
  repository can serve different versions (a canary serves the candidate, the others what the
  shared config says) without a copy of the repository or a restart. An empty or missing file
  pins nothing. A pinned version is verified like any other.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import tritonclient.http as httpclient
from google.protobuf import json_format, text_format
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.utils import InferenceServerException, triton_to_np_dtype

from export.repository import COMPLETION_RECORD, versions
from export.triton_config import parse_pbtxt
from serve.endpoints import CONTROL_KEY_ENV, CONTROL_KEY_FILE_ENV
from serve.standin import is_onnx_model, model_dirs, refresh_shadow_model, served_config
from serve.triton_api import TritonAPI

VERSIONS_TOOL = Path(__file__).resolve().with_name("versions.py")
CHECK_TIMEOUT_S = 300.0  # one version's check (onnxruntime loads and runs it once)
CHECK_REJECTED = 3  # serve/versions.py --check's status for a refused version


def fingerprint(model_dir: Path) -> tuple:
    """What a model folder holds: every file's path, size and modification time."""
    rows = []
    for root, dirs, files in os.walk(model_dir):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d != "__pycache__")
        for name in sorted(files):
            if name.startswith("."):
                continue
            path = Path(root) / name
            try:
                st = path.stat()
            except OSError:
                continue
            rows.append((str(path.relative_to(model_dir)), st.st_size, st.st_mtime_ns))
    return tuple(rows)


def read_pins(path: Path) -> dict[str, int]:
    """A pins file: ``MODEL VERSION`` per line, ``#`` comments; missing or empty: no pin (and a line that
    is not of that form pins nothing)."""
    try:
        text = path.read_text()
    except OSError:
        return {}
    pins = {}
    for line in text.splitlines():
        fields = line.split("#", 1)[0].split()
        if len(fields) == 2 and fields[1].isdigit():
            pins[fields[0]] = int(fields[1])
    return pins


class RepositoryFollower:
    """Rolls out what changes in the model repository, loading only verified versions; see the module doc."""

    def __init__(
        self,
        api: TritonAPI,
        repository: Path | None,  # None: a remote repository, not watched
        shadow: Path | None,
        gpu: bool,
        standin: bool,  # the shadow runs ONNX models through the stand-in (no onnxruntime backend)
        log: Callable[[str], None],
        infer_headers: dict[str, str] | None,
        pins: Path | None,
    ) -> None:
        self.api = api
        self.pins_file = pins
        self.repository, self.shadow, self.gpu, self.standin = repository, shadow, gpu, standin
        self.log = log
        self._served = {d.name: self._fingerprint(d) for d in model_dirs(repository)} if repository else {}
        self._pending: dict[str, tuple] = {}
        self.rollouts = 0
        self.rolled_out: Counter[str] = Counter()  # rollouts per model (serve/metrics.py)
        self.infer_headers = infer_headers  # the inference key, when the data plane is locked too (smoke inferences)
        self.serving: dict[str, list[int]] = {}  # the versions loaded of each verified (ONNX) model
        self._loaded_config: dict[str, str] = {}  # the config override each of those was loaded with
        self._checked: dict[tuple[str, int], tuple[tuple, str | None]] = {}  # (model, version) -> (files, reason)
        self.rejected = 0  # versions refused, at whatever stage (tests and logs read it)
        self.rejections: list[tuple[str, int, str]] = []  # (model, version, why), in order
        # While a changed model rolls out, the serving version answers on: a model (or an ensemble reloaded with
        # it) briefly not READY in the index, or an index slow to answer, is no reason to leave the pool.
        self.rolling_out = False

    def pins(self) -> dict[str, int]:
        """model -> the version this server is pinned to (``pins``), overriding the config's policy."""
        return read_pins(self.pins_file) if self.pins_file is not None else {}

    def _fingerprint(self, model_dir: Path) -> tuple:
        """The model folder's files and this server's pin of the model: a new pin is a rollout too."""
        pin = self.pins().get(model_dir.name)
        return fingerprint(model_dir) + ((("pin", pin),) if pin is not None else ())

    def models(self) -> list[str]:
        """The models of the repository it follows (none for a remote one)."""
        return list(self._served)

    def queue_sizes(self) -> dict[str, int]:
        """model -> the ``max_queue_size`` of the config it serves (verified models with a bounded queue):
        Triton's metrics count a full queue's refusals nowhere, so the overload alert compares its
        pending requests with this (serve/metrics.py)."""
        sizes = {}
        for name, config in dict(self._loaded_config).items():  # a copy: the supervising thread writes it
            size = json_format.Parse(config, mc.ModelConfig()).dynamic_batching.default_queue_policy.max_queue_size
            if size > 0:
                sizes[name] = size
        return sizes

    def load(self, name: str, versions: list[int] | None = None) -> str | None:
        """Load (or reload) ``name``; None when it worked, else Triton's error. A verified model is
        loaded with exactly ``versions`` (default: those it serves), never what its policy picks."""
        if versions is None:
            versions = self.serving.get(name)
        try:
            config = None
            if versions is not None:
                config = self._override(name, versions)
                if self.shadow is not None and self.repository is not None:  # what Triton reads from disk agrees
                    refresh_shadow_model(self.repository / name, self.shadow, self.gpu, versions, self.standin)
            return self.api.load(name, config)
        except (OSError, text_format.ParseError) as e:  # the model's config.pbtxt
            return f"cannot read its config: {e}"

    def _served_config(self, name: str, versions: list[int]) -> mc.ModelConfig:
        """The config Triton gets for ONNX model ``name`` serving exactly ``versions``."""
        assert self.repository is not None
        cfg = parse_pbtxt((self.repository / name / "config.pbtxt").read_text())
        return served_config(cfg, self.gpu, self.standin and self.shadow is not None, versions)

    def _override(self, name: str, versions: list[int]) -> str:
        """The served config with a policy of exactly ``versions``, as Triton's load API takes it."""
        return json_format.MessageToJson(self._served_config(name, versions))

    # -- the repository's changes --------------------------------------------------------
    def check(self) -> None:
        """One poll: roll out each model folder that changed and then held still for a whole poll."""
        if self.repository is None:
            return
        current = {d.name: self._fingerprint(d) for d in model_dirs(self.repository)}
        changed = [name for name, fp in current.items() if self._served.get(name) != fp]
        ready = []
        for name in changed:
            if self._pending.get(name) == current[name]:
                ready.append(name)  # unchanged for one whole poll: the writer is done
            else:
                self._pending[name] = current[name]
        # Models before the ensembles that call them; each load also reloads its dependents.
        for name in sorted(ready, key=lambda n: _is_ensemble(self.repository / n)):
            self._pending.pop(name, None)
            self.rolling_out = True
            try:
                self._roll_out(name, current[name])
            finally:
                self.rolling_out = False
        for name in set(self._served) - set(current):
            self.log(f"[supervisor] {name}: removed from the repository; unloading")
            self.api.unload(name)
            del self._served[name]

    def _roll_out(self, name: str, fp: tuple) -> None:
        started = time.monotonic()
        assert self.repository is not None
        self._served[name] = fp  # a failed load is not retried until the files change again
        if self._verified_model(name):  # its shadow holds the versions loaded: refreshed by each load
            before = self._loaded_config.get(name)
            error = self.serve_verified(name)
            if error is not None:
                self.log(f"[supervisor] {name}: {error}")
            if error is not None or self._loaded_config.get(name) == before:
                return  # nothing changed: a refused version, the old one serving on
        else:
            if self.shadow is not None:
                refresh_shadow_model(self.repository / name, self.shadow, self.gpu, None, self.standin)
            error = self.load(name)
            if error is not None:
                self.log(f"[supervisor] {name}: the changed model failed to load: {error}")
                return
        self.rollouts += 1
        self.rolled_out[name] += 1
        versions = self._ready_versions(name)
        self.log(
            f"[supervisor] {name}: repository changed; now serving version {', '.join(versions) or '?'} "
            f"(loaded in {time.monotonic() - started:.1f} s)"
        )

    # -- verified versions ---------------------------------------------------------------
    def prepare(self) -> list[str]:
        """Before Triton starts: put only the verified versions each ONNX model's policy selects in
        the shadow, which Triton then loads whole; returns what cannot be served ("failed to load
        'NAME': why")."""
        assert self.repository is not None and self.shadow is not None
        errors = []
        for model_dir in model_dirs(self.repository):
            name = model_dir.name
            if not self._verified_model(name):
                continue
            try:
                wanted, _ = self._choose(name)
            except (OSError, text_format.ParseError) as e:
                errors.append(f"failed to load '{name}': cannot read its config: {e}")
                continue
            if not wanted:
                errors.append(f"failed to load '{name}': no version passed the checks ({self._reasons(name)})")
                continue
            refresh_shadow_model(model_dir, self.shadow, self.gpu, wanted, self.standin)
            self.serving[name] = wanted
            self._loaded_config[name] = self._override(name, wanted)
        return errors

    def _reasons(self, name: str) -> str:
        return "; ".join(f"version {v}: {why}" for m, v, why in self.rejections if m == name) or "no version"

    def _verified_model(self, name: str) -> bool:
        """Whether ``name``'s versions are checked before loading: the ONNX models (the exported
        classifiers); the preprocessing model and the ensembles are loaded as they are."""
        if self.repository is None:
            return False
        try:
            return is_onnx_model(parse_pbtxt((self.repository / name / "config.pbtxt").read_text()))
        except (OSError, text_format.ParseError):
            return False

    def _check_key(self, model_dir: Path, version: int, cfg: mc.ModelConfig) -> tuple:
        """What a check of ``version`` depends on: its files, the label files, the config's tensors
        (not its version policy: a rollback needs no new check)."""
        labels = sorted({o.label_filename for o in cfg.output if o.label_filename})
        stats = []
        for label in labels:
            try:
                st = (model_dir / label).stat()
                stats.append((label, st.st_size, st.st_mtime_ns))
            except OSError:
                stats.append((label, None, None))
        tensors = tuple(t.SerializeToString(deterministic=True) for t in (*cfg.input, *cfg.output))
        io = (cfg.max_batch_size, cfg.default_model_filename, cfg.backend, cfg.platform, tensors)
        return fingerprint(model_dir / str(version)), tuple(stats), io

    def _verify(self, name: str, version: int, cfg: mc.ModelConfig) -> bool:
        """Whether ``version`` passed ``serve/versions.py --check`` with its current files (checked once)."""
        assert self.repository is not None
        key = self._check_key(self.repository / name, version, cfg)
        cached = self._checked.get((name, version))
        if cached is not None and cached[0] == key:
            return cached[1] is None
        reason = self._run_check(name, version)
        self._checked[(name, version)] = (key, reason)
        if reason is not None:
            self._reject(name, version, reason)
        return reason is None

    def _run_check(self, name: str, version: int) -> str | None:
        assert self.repository is not None
        cmd = [sys.executable, str(VERSIONS_TOOL), "--model-repository", str(self.repository), "--name", name,
               "--check", str(version)]  # fmt: skip
        # The check reads the repository and nothing else: no operators' key in its environment.
        env = {k: v for k, v in os.environ.items() if k not in (CONTROL_KEY_ENV, CONTROL_KEY_FILE_ENV)}
        try:
            done = subprocess.run(
                cmd, capture_output=True, text=True, timeout=CHECK_TIMEOUT_S, stdin=subprocess.DEVNULL, env=env
            )
        except subprocess.TimeoutExpired:
            return f"its check did not finish within {CHECK_TIMEOUT_S:.0f} s"
        if done.returncode == 0:
            return None
        if done.returncode == CHECK_REJECTED and done.stdout.strip():
            return done.stdout.strip().splitlines()[-1].split(": ", 1)[-1]
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return f"its check failed (status {done.returncode}): {tail}"

    def _reject(self, name: str, version: int, reason: str, key: tuple | None = None) -> None:
        """Count and log a refused version; ``key``: remember it as refused until its files change."""
        if key is not None:
            self._checked[(name, version)] = (key, reason)
        self.rejected += 1
        self.rejections.append((name, version, reason))
        serving = self.serving.get(name)
        still = f"version {', '.join(map(str, serving))} keeps serving" if serving else "no version of it is serving"
        hint = ""
        if COMPLETION_RECORD in reason and self.repository is not None:
            hint = (f" (a version copied by hand: python serve/versions.py --model-repository {self.repository} "
                    f"--name {name} --seal {version})")  # fmt: skip
        self.log(f"[supervisor] {name}: version {version} refused: {reason}; {still}{hint}")

    def _choose(self, name: str) -> tuple[list[int], mc.ModelConfig]:
        """The verified versions ``name``'s policy selects: ``latest:N`` the newest N verified ones."""
        assert self.repository is not None
        model_dir = self.repository / name
        cfg = parse_pbtxt((model_dir / "config.pbtxt").read_text())
        on_disk = versions(model_dir)
        policy = cfg.version_policy
        if (pin := self.pins().get(name)) is not None:
            policy = mc.ModelVersionPolicy(specific=mc.ModelVersionPolicy.Specific(versions=[pin]))
        which = policy.WhichOneof("policy_choice")
        if which == "specific":
            order, wanted = [v for v in sorted(set(policy.specific.versions)) if v in on_disk], len(on_disk)
        elif which == "all":
            order, wanted = on_disk, len(on_disk)
        else:
            order, wanted = on_disk[::-1], max(1, policy.latest.num_versions) if which == "latest" else 1
        chosen: list[int] = []
        for version in order:
            if len(chosen) >= wanted:
                break
            if self._verify(name, version, cfg):
                chosen.append(version)
        return sorted(chosen), cfg

    def serve_verified(self, name: str) -> str | None:
        """Bring ``name``'s loaded versions to the verified ones its policy selects: a new version is
        loaded beside the serving ones, must answer a smoke inference, and only then do the old ones
        go. Returns why nothing could be served, or None (also when the old version keeps serving)."""
        assert self.repository is not None
        for _ in range(8):  # each round refuses at least one version, or ends
            try:
                wanted, cfg = self._choose(name)
            except (OSError, text_format.ParseError) as e:
                return f"cannot read its config: {e}"
            current = self.serving.get(name, [])
            if not wanted:
                if current:
                    self.log(f"[supervisor] {name}: no verified version to change to; version "
                             f"{', '.join(map(str, current))} keeps serving")  # fmt: skip
                    return None
                return "no version passed the checks (see the log lines above)"
            if wanted == current and self._override(name, wanted) == self._loaded_config.get(name):
                return None
            new = [v for v in wanted if v not in current]
            both = sorted(set(current) | set(wanted))
            error = self.load(name, both if new else wanted)
            if error is not None:
                for v in new:
                    key = self._check_key(self.repository / name, v, cfg)
                    self._reject(name, v, f"Triton failed to load it: {error}", key)
                if current:
                    self.load(name, current)
                if not new:
                    return error
                continue
            bad = []
            for v in new:
                if (reason := self._smoke(name, v)) is not None:
                    bad.append(v)
                    self._reject(name, v, reason, self._check_key(self.repository / name, v, cfg))
            final = [v for v in wanted if v not in bad] or current
            if final != (both if new else wanted):
                if not final:
                    self.api.unload(name)
                    self.serving.pop(name, None)
                    self._loaded_config.pop(name, None)
                    continue
                if (error := self.load(name, final)) is not None:
                    return error
            self.serving[name] = final
            self._loaded_config[name] = self._override(name, final)
            if not bad:
                return None
        return "gave up after refusing too many versions"

    def _smoke(self, name: str, version: int) -> str | None:
        """Why ``version``, loaded in Triton, does not answer a batch of zeros with finite outputs of
        the configured shapes; None when it does."""
        cfg = self._served_config(name, [version])
        batch = [1] if cfg.max_batch_size > 0 else []
        inputs = []
        for t in cfg.input:
            dtype = mc.DataType.Name(t.data_type).removeprefix("TYPE_")
            dtype = "BYTES" if dtype == "STRING" else dtype
            shape = batch + [d if d > 0 else 1 for d in t.dims]
            data = np.zeros(shape, dtype=object if dtype == "BYTES" else triton_to_np_dtype(dtype))
            inp = httpclient.InferInput(t.name, shape, dtype)
            inp.set_data_from_numpy(data)
            inputs.append(inp)
        outputs = [httpclient.InferRequestedOutput(o.name) for o in cfg.output]
        try:
            result = self.api.client.infer(name, inputs, model_version=str(version), outputs=outputs,
                                           headers=self.infer_headers, timeout=int(CHECK_TIMEOUT_S * 1e6))  # fmt: skip
        except InferenceServerException as e:
            return f"a smoke inference in Triton failed: {e.message() or e}"
        for o in cfg.output:
            array = result.as_numpy(o.name)
            shape = batch + list(o.dims)
            if array is None:
                return f"a smoke inference in Triton gave no output {o.name!r}"
            if len(array.shape) != len(shape) or any(e > 0 and a != e for e, a in zip(shape, array.shape, strict=True)):
                return f"a smoke inference gave {o.name!r} shape {list(array.shape)}, the config says {shape}"
            if array.dtype.kind == "f" and not np.isfinite(array).all():
                return f"a smoke inference gave {o.name!r} values that are not finite"
        return None

    def _ready_versions(self, name: str) -> list[str]:
        return sorted(self.api.ready_versions(name), key=lambda v: int(v) if v.isdigit() else -1)


def _is_ensemble(model_dir: Path) -> bool:
    config = model_dir / "config.pbtxt"
    return config.exists() and 'platform: "ensemble"' in config.read_text()
