"""Shared test builders: configs without params.yaml, tiny models."""

from __future__ import annotations

import copy
import dataclasses
import socket
import threading

from diffusion.config import SampleConfig, ScheduleConfig
from rin.model import RIN, RINConfig
from rin.presets import PRESETS


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
