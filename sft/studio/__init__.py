"""Not in the book: the machinery that turns the chapter's functions into SFT Studio's runs.

- ``files``: atomic writes and tolerant readers (a leaf: imports nothing of ours)
- ``locks``: one training per device on this machine (a leaf)
- ``hardware``: which device, whether bf16 is fast there, TF32 scoped to a block
- ``config``: ``TrainConfig``, every run setting once (the CLI and pages are built from it)
- ``checkpoint``: what a checkpoint holds, and resuming exactly (RNG, epoch replay)
- ``trainer``: the training loop and its events
- ``distributed``: DDP's batch rule across torchrun's processes
- ``finetuned``: the final weights' files (.pth, .safetensors, .json)
- ``answers``: answering a split and saving it as the chapter does
- ``runs``: run folders (status, metrics, the model a run trained)
- ``worker``: the process that trains a run folder, and launching it
"""
