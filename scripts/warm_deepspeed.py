"""Pre-build DeepSpeed's CPU ops into TORCH_EXTENSIONS_DIR so no test or actor compiles them.

On the CPU accelerator `deepspeed.init_distributed` JIT-compiles the shared-memory comm op
(≈25 s on a quiet machine, minutes on a busy one). The DeepSpeed engine here uses torch's AdamW as
its client optimizer, so cpu_adam / fused_adam are never needed and are not built.

Usage: TORCH_EXTENSIONS_DIR=.torch_extensions python scripts/warm_deepspeed.py
"""

from __future__ import annotations

import os
import sys
import time

os.environ.setdefault("DS_ACCELERATOR", "cpu")


def main() -> int:
    from deepspeed.accelerator import get_accelerator

    target = os.environ.get("TORCH_EXTENSIONS_DIR", "(torch default cache)")
    for name in ("ShareMemCommBuilder",):
        builder = get_accelerator().create_op_builder(name)
        if builder is None:
            print(f"{name}: not used by the {get_accelerator().device_name()} accelerator")
            continue
        start = time.perf_counter()
        builder.load(verbose=False)
        print(f"{builder.absolute_name()}: ready in {target} ({time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
