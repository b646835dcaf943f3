"""``python -m slmkit.kernels``: build (or find cached) the CPU kernels and say whether they are in use."""

from . import load

if __name__ == "__main__":
    print("slmkit CPU kernels:", "built" if load() is not None else "not available (torch's ops are used)")
