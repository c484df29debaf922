"""The fleet simulator behind ``iotcompress simulate``: N simulated devices with their own
compute speeds and links train a real model on a real dataset with the real compressor, in
one process, on a simulated clock. See docs/global-training.md.

Example::

    from iotcompress.simulate import make_fleet, simulate, write_report
    result = simulate(make_fleet("mixed", devices=64), rounds=200)
    write_report(result, "simulation")
"""

from .clock import comm_time_ms, device_comm_ms, round_time_ms, transfer_ms
from .fleet import Device, Fleet, budgets, load_fleet_file, make_fleet

__all__ = [
    "comm_time_ms", "device_comm_ms", "round_time_ms", "transfer_ms",
    "Device", "Fleet", "budgets", "load_fleet_file", "make_fleet",
    "simulate", "write_report",
]


def __getattr__(name):  # torch and matplotlib load only when the simulation is used
    if name == "simulate":
        from .run import simulate
        return simulate
    if name == "write_report":
        from .report import write_report
        return write_report
    raise AttributeError(name)
