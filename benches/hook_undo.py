"""What a bucket's all-or-nothing undo costs per step: one compress pass over 25 M elements in
ten tensors (the shapes of benches/ddp_hook.py's model), top-0.1 % int8, with the earlier undo
(a copy of each compressor's state per step), with Compressor.revert on double-buffered
compressors (what the torch faces do now), and in place with no undo at all. Median of 5,
same process. Run: python benches/hook_undo.py"""
import time, functools, numpy as np, iotcompress as ic
sizes = [2236*2236, 2236]*5
g = [np.random.randn(s).astype(np.float32) for s in sizes]
def mk(db, mom):
    cs = [ic.Compressor(s, density=0.001, quant="int8", momentum=mom) for s in sizes]
    for c in cs: c.double_buffered = db
    return cs
def old(cs):
    for c, x in zip(cs, g):
        u = functools.partial(c.load_state_dict, c.state_dict()); c.compress(x)
def new(cs):
    for c, x in zip(cs, g):
        u = c.revert; c.compress(x)
for mom in [0.0, 0.9]:
    variants = {"old(copy,inplace)": (old, mk(False, mom)), "new(revert,db)": (new, mk(True, mom)), "plain inplace": (new, mk(False, mom))}
    res = {k: [] for k in variants}
    for rep in range(5):
        for k, (f, cs) in variants.items():
            t0 = time.perf_counter(); f(cs); res[k].append(time.perf_counter() - t0)
    print("momentum", mom, {k: f"{np.median(v)*1e3:.0f} ms" for k, v in res.items()})
