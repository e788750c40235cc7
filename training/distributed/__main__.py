"""``python -m training.distributed --run-dir RUN [--resume]``: the entry of each torchrun worker."""

from training.distributed.launch import worker_main

raise SystemExit(worker_main())
