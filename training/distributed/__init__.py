"""Distributed training building blocks, one module per idea (as ``torchrec/distributed/``):

- ``launch``: start N workers through torchrun; the workers' entry (``python -m training.distributed``)
- ``process_group``: join the process group (gloo on CPU, nccl on CUDA), gather to rank 0
- ``sharding``: TorchRec sharders, planner constraints, DMP, the keyed optimizer
- ``checkpoint``: DCP checkpoints, resumable with any number of processes

Each rank's part of a parquet file is read by ``training.data`` (``read_rank_part``). The jobs
(``training/train_sharded.py``) compose these; nothing here knows about the training loop.
"""
