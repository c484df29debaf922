"""Fleets of simulated devices: a compute-speed factor and a ``NetworkProfile`` each.

A fleet is given as

* ``mixed``: a seeded mix of the network presets, each with its class of compute speed
  (jittered, log-normal, sigma 0.3);
* ``uniform-PRESET`` (e.g. ``uniform-intercontinental``, ``uniform-lora``): identical devices;
* a CSV or TOML file. Each row / ``[[device]]`` entry has either ``preset`` or both
  ``latency_ms`` and ``bandwidth_mbps`` (which override the preset's when both are given),
  and optionally ``compute_speed`` (default: the preset's class, 1.0 for custom links),
  ``name`` and ``count`` (the entry stands for that many devices). With ``--devices N`` the
  file's devices are repeated in order to make N.

``compute_speed`` is relative to one core of the machine running the simulation: a device of
speed 0.1 takes ten times the measured time of one forward/backward of its batch.

CSV example::

    name,preset,latency_ms,bandwidth_mbps,compute_speed,count
    gateway,home-wifi,,,0.5,4
    sensor,lora,,,0.01,12
    far-server,,150,200,1.0,1

TOML example::

    [[device]]
    preset = "lte"
    compute_speed = 0.2
    count = 8

    [[device]]
    name = "far-server"
    latency_ms = 150
    bandwidth_mbps = 200
"""

from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence

import numpy as np

from iotcompress import NetworkProfile

__all__ = ["Device", "Fleet", "PRESET_SPEED", "MIXED_WEIGHTS", "make_fleet", "load_fleet_file", "NetworkProfile"]

#: Compute speed of each preset's typical device, relative to one core of the simulating
#: machine: a server (datacenter, or far away over an intercontinental link), a laptop on
#: home Wi-Fi, a phone on LTE, a microcontroller-class sensor on LoRa.
PRESET_SPEED: Dict[str, float] = {
    "datacenter": 1.0,
    "intercontinental": 1.0,
    "home-wifi": 0.5,
    "lte": 0.2,
    "lora": 0.01,
}

#: The ``mixed`` fleet's share of each preset.
MIXED_WEIGHTS: Dict[str, float] = {
    "datacenter": 0.1,
    "intercontinental": 0.2,
    "home-wifi": 0.3,
    "lte": 0.3,
    "lora": 0.1,
}

_KEYS = ("name", "preset", "latency_ms", "bandwidth_mbps", "compute_speed", "count")


@dataclass(frozen=True)
class Device:
    """One simulated device: its name, link and compute-speed factor."""

    name: str
    profile: Any  # NetworkProfile
    compute_speed: float


class Fleet(list):
    """A list of :class:`Device` with its description (``fleet.source``)."""

    def __init__(self, devices: Iterable[Device], source: str) -> None:
        super().__init__(devices)
        self.source = source

    @property
    def latency_ms(self) -> np.ndarray:
        return np.array([d.profile.latency_ms for d in self], np.float64)

    @property
    def bandwidth_mbps(self) -> np.ndarray:
        return np.array([d.profile.bandwidth_mbps for d in self], np.float64)

    @property
    def compute_speed(self) -> np.ndarray:
        return np.array([d.compute_speed for d in self], np.float64)

    def summary(self) -> List[Dict[str, Any]]:
        """One row per distinct link: name, count, latency, bandwidth, mean compute speed."""
        groups: Dict[Any, List[Device]] = {}
        for d in self:
            groups.setdefault((d.profile.name, d.profile.latency_ms, d.profile.bandwidth_mbps), []).append(d)
        return [
            dict(link=k[0], devices=len(v), latency_ms=k[1], bandwidth_mbps=k[2],
                 compute_speed=float(np.mean([d.compute_speed for d in v])))
            for k, v in sorted(groups.items(), key=lambda kv: -len(kv[1]))
        ]


def preset_names() -> List[str]:
    return list(NetworkProfile.PRESETS)


def make_fleet(spec: str, devices: Optional[int] = None, seed: int = 0) -> Fleet:
    """The fleet named by ``spec`` (``mixed``, ``uniform-PRESET`` or a ``.csv``/``.toml`` path)
    with ``devices`` devices (default 64 for named fleets, the file's own count for files).

    Example::

        fleet = make_fleet("mixed", devices=64, seed=0)
        fleet = make_fleet("uniform-lora", devices=16)
        fleet = make_fleet("my_fleet.toml")
    """
    if devices is not None and (isinstance(devices, bool) or not isinstance(devices, int) or devices < 1):
        raise ValueError(f"devices must be an int >= 1, got {devices!r}")
    if spec.endswith((".csv", ".toml")) or os.sep in spec:
        return load_fleet_file(spec, devices)
    n = 64 if devices is None else devices
    if spec == "mixed":
        rng = np.random.default_rng(seed)
        names = list(MIXED_WEIGHTS)
        p = np.array([MIXED_WEIGHTS[k] for k in names])
        # Exact shares (largest remainder), shuffled, so a fleet of 64 has its 10 % of LoRa.
        counts = np.floor(p * n).astype(int)
        for k in np.argsort(-(p * n - counts), kind="stable")[: n - counts.sum()]:
            counts[k] += 1
        kinds = np.repeat(np.arange(len(names)), counts)
        rng.shuffle(kinds)
        jitter = rng.lognormal(0.0, 0.3, n)
        return Fleet(
            (Device(f"{names[k]}-{i}", NetworkProfile.preset(names[k]), PRESET_SPEED.get(names[k], 1.0) * float(j))
             for i, (k, j) in enumerate(zip(kinds, jitter))),
            f"mixed (seed {seed})",
        )
    if spec.startswith("uniform-"):
        name = spec[len("uniform-"):]
        profile = _preset(name, where=f"fleet {spec!r}")
        speed = PRESET_SPEED.get(name, 1.0)
        return Fleet((Device(f"{name}-{i}", profile, speed) for i in range(n)), spec)
    raise ValueError(
        f"unknown fleet {spec!r}; use 'mixed', 'uniform-PRESET' with PRESET one of "
        f"{', '.join(preset_names())}, or a .csv / .toml fleet file"
    )


def _preset(name: str, where: str):
    try:
        return NetworkProfile.preset(name)
    except (KeyError, ValueError):
        raise ValueError(f"{where}: unknown preset {name!r}; choose one of {', '.join(preset_names())}") from None


def _number(value: Any, key: str, where: str, positive: bool = True) -> Optional[float]:
    if value is None or (isinstance(value, str) and value.strip() == ""):
        return None
    if isinstance(value, bool):
        raise ValueError(f"{where}: {key} must be a number, got {value!r}")
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: {key} must be a number, got {value!r}") from None
    if not math.isfinite(x) or (x <= 0 if positive else x < 0):
        raise ValueError(f"{where}: {key} must be {'> 0' if positive else '>= 0'}, got {value!r}")
    return x


def _device_entries(entry: Mapping[str, Any], index: int, where: str) -> List[Device]:
    unknown = sorted(set(entry) - set(_KEYS))
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {', '.join(unknown)}; the fields are {', '.join(_KEYS)}")
    preset = entry.get("preset")
    preset = None if preset is None or str(preset).strip() == "" else str(preset).strip()
    latency = _number(entry.get("latency_ms"), "latency_ms", where, positive=False)
    bandwidth = _number(entry.get("bandwidth_mbps"), "bandwidth_mbps", where)
    speed = _number(entry.get("compute_speed"), "compute_speed", where)
    count = _number(entry.get("count"), "count", where)
    if count is not None and count != int(count):
        raise ValueError(f"{where}: count must be a whole number, got {entry.get('count')!r}")
    if preset is not None:
        base = _preset(preset, where)
        if latency is not None or bandwidth is not None:
            base = NetworkProfile(latency if latency is not None else base.latency_ms,
                                  bandwidth if bandwidth is not None else base.bandwidth_mbps, name=preset)
        profile = base
    else:
        if latency is None or bandwidth is None:
            raise ValueError(f"{where}: give a preset or both latency_ms and bandwidth_mbps")
        profile = NetworkProfile(latency, bandwidth, name="custom")
    if speed is None:
        speed = PRESET_SPEED.get(preset, 1.0) if preset else 1.0
    name = str(entry.get("name") or preset or "device").strip()
    n = 1 if count is None else int(count)
    return [Device(name if n == 1 else f"{name}-{k}", profile, speed) for k in range(n)]


def load_fleet_file(path: str, devices: Optional[int] = None) -> Fleet:
    """Reads a CSV or TOML fleet file (see the module docstring); errors name the file and the
    row or entry. With ``devices``, the file's devices are repeated in order to that count."""
    if not os.path.exists(path):
        raise ValueError(f"fleet file {path!r} does not exist")
    out: List[Device] = []
    if path.endswith(".toml"):
        try:
            import tomllib  # Python 3.11+
        except ImportError:  # pragma: no cover
            try:
                import tomli as tomllib  # type: ignore[no-redef]
            except ImportError:
                raise ValueError("TOML fleet files need Python 3.11+ (or pip install tomli); use a CSV file") from None
        with open(path, "rb") as f:
            try:
                doc = tomllib.load(f)
            except tomllib.TOMLDecodeError as e:
                raise ValueError(f"{path}: not valid TOML: {e}") from None
        entries = doc.get("device", doc.get("devices"))
        extra = sorted(set(doc) - {"device", "devices"})
        if extra:
            raise ValueError(f"{path}: unknown table(s) {', '.join(extra)}; list devices as [[device]] entries")
        if not isinstance(entries, list) or not entries or not all(isinstance(e, dict) for e in entries):
            raise ValueError(f"{path}: no devices; list them as [[device]] entries with a preset or latency_ms and bandwidth_mbps")
        for i, e in enumerate(entries):
            out.extend(_device_entries(e, i, f"{path}: device {i + 1}"))
    elif path.endswith(".csv"):
        with open(path, newline="") as f:
            rows = [r for r in csv.reader(f) if r and not r[0].lstrip().startswith("#")]
        if not rows:
            raise ValueError(f"{path}: empty fleet file; the first row names the columns ({', '.join(_KEYS)})")
        header = [h.strip() for h in rows[0]]
        for lineno, row in enumerate(rows[1:], start=2):
            if len(row) > len(header):
                raise ValueError(f"{path}: row {lineno} has {len(row)} fields, the header {len(header)}")
            out.extend(_device_entries(dict(zip(header, row)), lineno, f"{path}: row {lineno}"))
        if not out:
            raise ValueError(f"{path}: no devices below the header")
    else:
        raise ValueError(f"fleet file {path!r}: use a .csv or .toml file")
    if devices is not None:
        out = [out[i % len(out)] for i in range(devices)]
    return Fleet(out, os.path.basename(path))


def budgets(fleet: Sequence[Device], budget_ms: Optional[float], floor: int = 64) -> Dict[str, np.ndarray]:
    """Per-device byte budgets for one exchange: ``total = profile.bytes_within(budget)``, half
    for the upload and half for the download. ``budget_ms=None`` gives each device twice its
    own latency (the link spends as long sending as the round trip takes: the
    bandwidth-delay product each way). A device whose latency alone exceeds the budget gets
    ``floor`` bytes each way (it is reported as over budget)."""
    total = []
    over = []
    for d in fleet:
        b = 2.0 * d.profile.latency_ms if budget_ms is None else float(budget_ms)
        n = int(d.profile.bytes_within(b))
        over.append(n // 2 < floor)
        total.append(max(n // 2, floor))
    each = np.minimum(np.array(total, np.int64), 2**31)
    return {"up": each, "down": each.copy(), "over_budget": np.array(over, bool)}
