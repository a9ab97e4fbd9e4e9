"""`python -m cxrscreen.training ARGS`, what torchrun starts: `cxrscreen train ARGS` in each process.

    torchrun --nproc_per_node N -m cxrscreen.training --data ... --split ... --out RUN
"""

from cxrscreen.engine.distributed import main

main()
