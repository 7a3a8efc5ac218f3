"""What runs a program: training (`training`, its options in `train_config`), data reading,
tokenizers and masking (`data`), generation (`generation`), model-parallel runs (`parallel`: pipeline
and tensor; `sequence_parallel`: one sequence split over ranks), and
the one torchrun launcher every multi-process run shares (`launch`, the parent; `rank`, the entry
point of each rank).

The runtime builds on the core (`optpipe.program`, `optpipe.kv_step`, `optpipe.losses`, ...);
nothing in the core, the passes or the targets imports it. The package facade (`optpipe.train`,
`optpipe.generate`) and the CLI reach it on call (the CLI reads `train_config.TrainConfig` up front:
the `optpipe train` options are its fields).
"""
