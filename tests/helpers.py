"""Shared test builders: configs without params.yaml, tiny models."""

from __future__ import annotations

import copy
import dataclasses
import socket
import threading
from pathlib import Path

import pytest

from diffusion.config import SampleConfig, ScheduleConfig
from rin.model import RIN, RINConfig
from rin.presets import PRESETS

# The real data and weights some tests need. A test that needs one fails when it is missing (and says how to get
# it): a skip decided at collection time turns "not installed here" into a green run that checked nothing.
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")  # params.yaml datasets.fashion_mnist.root
FASHION_MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                       "t10k-labels-idx1-ubyte")  # fmt: skip


def require_fashion_mnist(root: Path = FASHION_MNIST) -> Path:
    """`root` if it holds the four Fashion-MNIST idx files (.gz or not); else the calling test fails, naming them."""
    missing = [name for name in FASHION_MNIST_FILES if not any((root / (name + ext)).exists() for ext in ("", ".gz"))]
    if missing:
        pytest.fail(f"{root}: no {', '.join(missing)}. This test needs Debian's dataset-fashion-mnist: `make "
                    "data-deps` (apt-get install dataset-fashion-mnist)", pytrace=False)  # fmt: skip
    return root


def require_fid_inception() -> Path:
    """The hash-pinned FID Inception in the weights cache, fetched on a miss; else the calling test fails."""
    from diffusion.metrics.weights import WeightsError, fetch_fid_inception

    try:
        return fetch_fid_inception()
    except WeightsError as err:
        pytest.fail(f"FID Inception weights unavailable: {err}", pytrace=False)


def require_i3d() -> Path:
    """The hash-pinned Kinetics-400 I3D in the weights cache, fetched on a miss; else the calling test fails."""
    from diffusion.metrics.weights import WeightsError, resolve_i3d_weights

    try:
        return resolve_i3d_weights()
    except WeightsError as err:
        pytest.fail(f"I3D weights unavailable: {err}", pytrace=False)


def sample_config(**kw) -> SampleConfig:
    base = dict(sampler="ddpm", steps=8, schedule=ScheduleConfig("cosine", 0.0, 1.0, 1.0), variance="large", eta=0.0,
                clip_x0=True, td=0.0, num_samples=4, batch_size=4, seed=0, use_ema=False)
    return SampleConfig(**(base | kw))


def tiny_rin(**kw) -> RIN:
    return RIN(dataclasses.replace(PRESETS["rin_tiny"], **kw))


def tiny_config(**kw) -> RINConfig:
    return dataclasses.replace(PRESETS["rin_tiny"], **kw)


def with_key(raw: dict, path: str, value, delete: bool = False) -> dict:
    """A deep copy of a params dict with the dotted `path` set to `value` (or deleted); missing parents are made."""
    out = copy.deepcopy(raw)
    node = out
    keys = path.split(".")
    for k in keys[:-1]:
        node = node.setdefault(k, {})
    if delete:
        del node[keys[-1]]
    else:
        node[keys[-1]] = value
    return out



def load_checked(raw: dict):
    """What a stage does with params.yaml: parse it (diffusion.config), then let the registry check the model part."""
    from diffusion import registry
    from diffusion.config import parse_params

    params = parse_params(raw)
    registry.check(params)
    return params


def run_dirs(outputs, names) -> dict:
    """The report stage's --runs pairs for a folder laid out like outputs/: name -> outputs/<name>."""
    return {name: outputs / name for name in names}


class TcpProxy:
    """A TCP proxy on 127.0.0.1 in front of `upstream` (host, port): every accepted connection, numbered from 1, goes
    to `handle(client, n)` on a thread of its own; subclasses decide what reaches the upstream (faults on the wire)."""

    def __init__(self, upstream: tuple[str, int]):
        self.upstream, self.connections = upstream, 0
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self.handle, args=(client, self.connections), daemon=True).start()

    def handle(self, client: socket.socket, n: int) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self.sock.close()
