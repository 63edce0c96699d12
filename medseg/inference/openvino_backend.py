"""The network on OpenVINO's CPU runtime: converted once per checkpoint, window, window batch and precision, cached on
disk, compiled per predictor.

The sliding window (:func:`medseg.inference.sliding.sliding_window_logits`) calls an :class:`OpenVINONetwork` as
it calls a PyTorch network: a batch of float32 windows in, float32 logits out. Only the network's forward runs
in OpenVINO; cutting, Gaussian stitching, softmax and restore stay what they are.

**Conversion** (:func:`build_graph`): the PyTorch network → ONNX (:func:`medseg.inference.onnx_export.export_onnx`,
the same graph ``medseg export-model`` writes) → ``openvino.convert_model`` → reshaped to a fixed input
``(window batch, C, *window)``. Through ONNX rather than ``openvino.convert_model(nn.Module)`` because it
converts the default network in about a quarter of the time (10 s vs 38 s, ``docs/speed.md``, section
``medseg.inference.openvino_backend``); a fixed batch because it measured as fast or faster than a dynamic one
(the last, partial batch of a volume is padded with zeros and its extra rows dropped).

**Precision**: the compiled model's ``INFERENCE_PRECISION_HINT`` — ``f32`` for ``fp32``, ``bf16`` for ``bf16``
(:data:`HINTS`); ``int8`` graphs are not converted here but made by ``medseg quantize``
(:mod:`medseg.inference.quantize`) and stored in the same cache, their manifest carrying the calibration and the
agreement check (their float parts: ``f32``, or ``bf16`` where :func:`medseg.inference.quantize.int8_hint` says);
threads: ``torch.get_num_threads()`` (what ``OMP_NUM_THREADS`` or ``torch.set_num_threads`` set).

**Cache** (:func:`load_or_build`): one folder per :class:`GraphKey` — the checkpoint's SHA-256, window, window
batch, input channels, precision and OpenVINO version, so a changed checkpoint (or an upgraded OpenVINO) never
reuses a stale graph — holding ``model.xml`` / ``model.bin`` (OpenVINO IR) and ``manifest.json`` (the key and
the SHA-256 of both files), each written atomically (:mod:`medseg.io.atomic`), the manifest last. An entry is
used only when its manifest matches the key and both files' hashes; otherwise (a crash between writes, a
truncated or edited file) it is rebuilt with a warning. Where (:func:`cache_root`): ``.openvino-cache/`` beside
the checkpoint when that folder is writable, else ``$XDG_CACHE_HOME/medseg/openvino`` (``~/.cache/...``).
A changed checkpoint leaves its old entries behind (about 25 MB each for the default network): delete the
folder to reclaim them.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medseg.inference.onnx_export import export_onnx
from medseg.io import InputError
from medseg.io.atomic import atomic_path, atomic_write_text, temp_prefix

#: ``INFERENCE_PRECISION_HINT`` of the CPU plugin for each medseg precision (int8: of the parts NNCF left in
#: float, unless :func:`medseg.inference.quantize.int8_hint` says bf16).
HINTS = {"fp32": "f32", "bf16": "bf16", "int8": "f32"}
#: The cache folder's name beside a checkpoint.
CACHE_FOLDER = ".openvino-cache"
#: The files of one cache entry; the manifest is written last and vouches for the other two.
GRAPH_FILES = ("model.bin", "model.xml")
MANIFEST = "manifest.json"

_CORE: Any = None


def core() -> Any:
    """The process's one ``openvino.Core`` (made on first use)."""
    global _CORE
    if _CORE is None:
        import openvino as ov

        _CORE = ov.Core()
    return _CORE


def openvino_version() -> str:
    """The installed OpenVINO's version, e.g. ``2026.4.1-...``."""
    import openvino as ov

    return str(ov.get_version())


@dataclass(frozen=True)
class GraphKey:
    """What a converted graph depends on; its :attr:`name` is the cache entry's folder name."""

    sha256: str
    window: tuple[int, ...]
    batch: int
    in_channels: int
    precision: str
    version: str

    @property
    def name(self) -> str:
        version = hashlib.sha256(self.version.encode()).hexdigest()[:8]
        window = "x".join(map(str, self.window))
        return f"{self.sha256[:16]}-{window}-b{self.batch}-c{self.in_channels}-{self.precision}-ov{version}"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "window": list(self.window)}


def _user_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "medseg" / "openvino"


def _writable(folder: Path) -> bool:
    """Whether files can be created in ``folder`` (tried, not guessed from permission bits: root, ACLs)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=temp_prefix(folder / "probe")):
            pass
    except OSError:
        return False
    return True


def cache_root(checkpoint: str | os.PathLike) -> Path:
    """``.openvino-cache/`` beside ``checkpoint`` when that folder can be written, else the user cache
    (``$XDG_CACHE_HOME/medseg/openvino``, by default ``~/.cache/medseg/openvino``)."""
    beside = Path(checkpoint).resolve().parent / CACHE_FOLDER
    return beside if _writable(beside) else _user_cache()


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def build_graph(model: nn.Module, key: GraphKey, scratch: Path) -> Any:
    """``model`` → an ``openvino.Model`` with the fixed input ``(key.batch, key.in_channels, *key.window)``,
    through an ONNX file in ``scratch`` (module docstring)."""
    import openvino as ov

    onnx_file = export_onnx(model, scratch / "model.onnx", key.window, key.in_channels)
    graph = ov.convert_model(onnx_file)
    graph.reshape([key.batch, key.in_channels, *key.window])
    return graph


def _why_unusable(entry: Path, key: GraphKey) -> str | None:
    """None when ``entry`` holds a complete graph for ``key``, else the reason (manifest, key, hashes)."""
    try:
        manifest = json.loads((entry / MANIFEST).read_text())
    except FileNotFoundError:
        return "incomplete (no manifest: an interrupted write)"
    except (OSError, ValueError) as exc:
        return f"unreadable manifest ({exc})"
    if not isinstance(manifest, dict) or manifest.get("key") != key.to_dict():
        return "its manifest records another key"
    for name in GRAPH_FILES:
        path = entry / name
        if not path.is_file():
            return f"{name} is missing"
        if _file_sha256(path) != manifest.get("sha256", {}).get(name):
            return f"{name} does not match its manifest's SHA-256"
    return None


def _write_entry(graph: Any, entry: Path) -> dict[str, str]:
    """``graph`` as IR in ``entry``, each file atomically; returns their SHA-256 for the manifest."""
    import openvino as ov

    entry.mkdir(parents=True, exist_ok=True)
    (entry / MANIFEST).unlink(missing_ok=True)  # an entry without a manifest is never used
    scratch = Path(tempfile.mkdtemp(prefix=temp_prefix(entry / "ir"), dir=entry.parent))
    try:
        ov.save_model(graph, str(scratch / "model.xml"), compress_to_fp16=False)
        hashes = {}
        for name in GRAPH_FILES:
            hashes[name] = _file_sha256(scratch / name)
            with atomic_path(entry / name) as tmp:
                os.replace(scratch / name, tmp)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return hashes


def stored_entry(root: Path, key: GraphKey) -> tuple[Any, dict] | None:
    """The usable cached graph for ``key`` under ``root`` and its manifest, or None (absent or unusable)."""
    entry = root / key.name
    if not entry.exists() or _why_unusable(entry, key) is not None:
        return None
    try:
        return core().read_model(str(entry / "model.xml")), json.loads((entry / MANIFEST).read_text())
    except (RuntimeError, OSError, ValueError):
        return None


def store_entry(graph: Any, root: Path, key: GraphKey, record: dict[str, Any]) -> Path:
    """``graph`` cached under ``root`` for ``key``, its manifest holding ``record`` besides the key and hashes."""
    entry = root / key.name
    hashes = _write_entry(graph, entry)
    manifest = {"key": key.to_dict(), "sha256": hashes, **record}
    atomic_write_text(entry / MANIFEST, json.dumps(manifest, indent=1))
    return entry


def update_manifest(root: Path, key: GraphKey, record: dict[str, Any]) -> None:
    """Add ``record`` to the manifest of the cached entry for ``key`` (atomically; the hashes stay)."""
    path = root / key.name / MANIFEST
    manifest = json.loads(path.read_text())
    atomic_write_text(path, json.dumps({**manifest, **record}, indent=1))


def load_or_build(model: nn.Module, key: GraphKey, root: Path) -> Any:
    """The cached graph for ``key`` under ``root``, or a new one converted from ``model`` and cached.

    An entry that exists but is unusable (:func:`_why_unusable`) is rebuilt, with a ``RuntimeWarning`` that names
    it and the reason.
    """
    entry = root / key.name
    if entry.exists():
        reason = _why_unusable(entry, key)
        if reason is None:
            try:
                return core().read_model(str(entry / "model.xml"))
            except RuntimeError as exc:
                reason = f"OpenVINO cannot read it ({str(exc).strip().splitlines()[-1]})"
        warnings.warn(f"{entry}: OpenVINO cache entry {reason}; rebuilding it", RuntimeWarning, stacklevel=2)
    root.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=temp_prefix(entry / "onnx"), dir=root))
    try:
        graph = build_graph(model, key, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    hashes = _write_entry(graph, entry)
    atomic_write_text(entry / MANIFEST, json.dumps({"key": key.to_dict(), "sha256": hashes}, indent=1))
    return graph  # the one converted here, not re-read: another process may be replacing the files


class OpenVINONetwork:
    """A compiled OpenVINO graph called like the network: ``windows (b, C, *window)`` → float32 logits
    ``(b, K, *window)``, for any ``b`` (batches other than the compiled one are padded or split).

    Example:
        >>> net = OpenVINONetwork(graph, key)                # doctest: +SKIP
        >>> net(torch.zeros(2, 1, 96, 96, 64)).shape         # doctest: +SKIP
        torch.Size([2, 7, 96, 96, 64])
    """

    def __init__(
        self, graph: Any, key: GraphKey, threads: int | None = None, hint: str | None = None
    ) -> None:
        self.hint = hint or HINTS[key.precision]
        config = {
            "INFERENCE_PRECISION_HINT": self.hint,
            "INFERENCE_NUM_THREADS": int(threads or torch.get_num_threads()),
            "PERFORMANCE_HINT": "LATENCY",
        }
        self.key = key
        self.compiled = core().compile_model(graph, "CPU", config)
        self.request = self.compiled.create_infer_request()

    def _run(self, windows: np.ndarray) -> np.ndarray:
        n = windows.shape[0]
        if n < self.key.batch:
            pad = np.zeros((self.key.batch - n, *windows.shape[1:]), dtype=np.float32)
            windows = np.concatenate([windows, pad])
        out = self.request.infer({0: windows})[0]
        return np.array(out[:n], dtype=np.float32)  # a copy: the request reuses its output buffer

    def __call__(self, windows: torch.Tensor) -> torch.Tensor:
        x = np.ascontiguousarray(windows.detach().to("cpu", torch.float32).numpy())
        if x.shape[1:] != (self.key.in_channels, *self.key.window):
            raise ValueError(
                f"OpenVINO graph for windows {(self.key.in_channels, *self.key.window)}, got {x.shape[1:]}"
            )
        parts = [self._run(x[i : i + self.key.batch]) for i in range(0, x.shape[0], self.key.batch)]
        return torch.from_numpy(np.concatenate(parts)).to(windows.device)


def openvino_network(
    model: nn.Module, key: GraphKey, checkpoint: str | os.PathLike | None
) -> OpenVINONetwork:
    """``model`` compiled by OpenVINO for ``key``, the graph cached under :func:`cache_root` of ``checkpoint``;
    without a checkpoint (a network in memory) converted in a temporary folder and not cached.

    Raises:
        InputError: the conversion failed (one line: OpenVINO's last message).
    """
    try:
        if checkpoint is None:
            with tempfile.TemporaryDirectory(prefix="medseg-openvino-") as scratch:
                graph = build_graph(model, key, Path(scratch))
        else:
            graph = load_or_build(model, key, cache_root(checkpoint))
        return OpenVINONetwork(graph, key)
    except RuntimeError as exc:
        where = checkpoint or "network"
        raise InputError(
            f"{where}: OpenVINO conversion failed: {str(exc).strip().splitlines()[-1]}"
        ) from None
