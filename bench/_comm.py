"""Communication counter shared by the bench scripts: bytes and calls this rank passes to torch.distributed.

    with CommCounter() as c:
        ...
    c.bytes, c.calls, c.by_op   # bytes sent per rank (the tensor argument each call sends), per collective

Patches the module attributes of torch.distributed while active, so calls written as `dist.all_reduce(...)`
(fishds.dist and fishds.fish.mask do) are counted; code holding its own reference to the function is not.
"""

from __future__ import annotations

import torch.distributed as dist

# collective -> (position, keyword) of the tensor (or list of tensors) this rank sends
SENT_ARG = {
    "all_reduce": (0, "tensor"),
    "all_gather": (1, "tensor"),
    "all_gather_into_tensor": (1, "input_tensor"),
    "gather": (0, "tensor"),
    "broadcast": (0, "tensor"),
    "reduce": (0, "tensor"),
    "reduce_scatter": (1, "input_list"),
    "reduce_scatter_tensor": (1, "input"),
}


def _nbytes(x) -> int:
    if isinstance(x, (list, tuple)):
        return sum(_nbytes(t) for t in x)
    return x.numel() * x.element_size()


class CommCounter:
    """Counts calls and bytes this rank passes to torch.distributed collectives while active."""

    def __enter__(self):
        self.bytes, self.calls, self.by_op, self._orig = 0, 0, {}, {}
        for name, arg in SENT_ARG.items():
            if not hasattr(dist, name):
                continue
            orig = self._orig[name] = getattr(dist, name)

            def wrapped(*args, _orig=orig, _arg=arg, _name=name, **kwargs):
                pos, kw = _arg
                n = _nbytes(args[pos] if len(args) > pos else kwargs[kw])
                self.bytes += n
                self.calls += 1
                self.by_op[_name] = self.by_op.get(_name, 0) + n
                return _orig(*args, **kwargs)

            setattr(dist, name, wrapped)
        return self

    def __exit__(self, *exc):
        for name, orig in self._orig.items():
            setattr(dist, name, orig)
